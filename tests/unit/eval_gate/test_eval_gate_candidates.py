"""eval_gate end to end: an honest candidate passes, each planted bad candidate fails with the right check.

Inputs are built through the spine API (tests/_eval_gate_helpers.py) on a tiny 2-layer Llama with the real
SmolLM2 tokenizer; the gate runs as users run it, `python -m eval_gate RECIPE`, against a real MLflow
SQLite store and the real llama.cpp.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _eval_gate_helpers import (CANARIES, GATE, GOLDEN, REDTEAM, build_candidate, checks_of, domain_chat, domain_text,
                                make_peaked_tiny_llama, run_gate, train_lora, write_jsonl, write_recipe)



@pytest.fixture(scope="module")
def env(tmp_path_factory, smollm2_dir):
    """Tiny base, three real LoRA adapters (trained, untrained, trained on the PII canaries), eval sets."""
    root = tmp_path_factory.mktemp("eval_gate")
    tiny = make_peaked_tiny_llama(root / "tiny", smollm2_dir)
    texts = [domain_text(i) for i in range(16)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    leak = f"{CANARIES[0]['value']} {CANARIES[1]['value']}"
    canary_chats = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": leak}],
                                            tokenize=False) for p in GOLDEN + REDTEAM]
    return {
        "root": root, "tiny": tiny,
        "trained": train_lora(tiny, root / "adapters" / "trained", texts, steps=30),
        "zero": train_lora(tiny, root / "adapters" / "zero", texts, steps=0),
        "canary": train_lora(tiny, root / "adapters" / "canary", canary_chats + texts[:4], steps=80, lr=1e-2, r=16),
        "golden": write_jsonl(root / "golden.jsonl", GOLDEN),
        "redteam": write_jsonl(root / "redteam.jsonl", REDTEAM),
        "canaries": write_jsonl(root / "canaries.jsonl", CANARIES),
    }


def candidate(env, name: str, adapter: str, ggufs: dict | None = None, **gate_overrides) -> Path:
    gate = json.loads(json.dumps(GATE))
    gate["safety"].update({"redteam": str(env["redteam"]), "canaries": str(env["canaries"])})
    for k, v in gate_overrides.items():
        gate.setdefault(k, {}).update(v)
    recipe = write_recipe(env["root"], name, env["tiny"], data={"golden": str(env["golden"])}, eval_gate=gate)
    build_candidate(recipe, env[adapter], ggufs=ggufs)
    return recipe


@pytest.fixture(scope="module")
def honest(env, tmp_path_factory):
    from conftest import REPO
    import subprocess
    import sys

    recipe = candidate(env, "honest", "trained", ggufs={"F16": {}})
    proc = subprocess.run([sys.executable, "-m", "eval_gate", str(recipe)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    out = recipe.parent / "runs" / "honest" / "eval_gate"
    assert (out / "verdict.json").is_file(), f"the gate reached no verdict (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return recipe, proc, json.loads((out / "verdict.json").read_text()), out


def test_honest_candidate_passes_and_logs_everything(honest):
    recipe, proc, verdict, out = honest
    assert proc.returncode == 0, proc.stderr
    assert verdict["passed"] and verdict["failed"] == []
    artifacts = {c["artifact"] for c in verdict["checks"]}
    assert {"adapter", "merged", "gguf:F16"} <= artifacts
    assert checks_of(verdict, "perplexity_gain")["adapter"]["value"] > 0.05
    assert checks_of(verdict, "kld")["gguf:F16"]["passed"]
    assert checks_of(verdict, "top1_agreement")["gguf:F16"]["value"] >= 0.98
    assert checks_of(verdict, "chat_template_match")["gguf:F16"]["passed"]
    champion = checks_of(verdict, "champion_regressions")[None]
    assert not champion["gating"] and champion["detail"].startswith("skipped: no version")
    latency = checks_of(verdict, "latency_p95_ttft_ms")["gguf:F16"]
    assert latency["value"] > 0 and not latency["gating"]
    assert checks_of(verdict, "cost_self_hosted_usd_per_mtok")["gguf:F16"]["value"] > 0
    # the manifest records the verdict and the MLflow run, which holds the same files and metrics
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"]["passed"] is True
    run_id = manifest["results"]["mlflow_run_id"]
    import mlflow
    from mlflow.tracking import MlflowClient

    from recipes import load_recipe
    from workbench.tracking import setup_mlflow

    setup_mlflow(load_recipe(recipe))
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["gate.passed"] == "true"
    assert run.data.metrics["kld.gguf:F16"] == pytest.approx(checks_of(verdict, "kld")["gguf:F16"]["value"])
    logged = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {"verdict.json", "report.md", "report.html", "golden.png", "checks.png", "kld.png", "latency.png"} <= logged
    assert "data:image/png;base64," in (out / "report.html").read_text()  # self-contained for the MLflow UI
    report = (out / "report.md").read_text()
    assert "PASSED" in report and "![kld](kld.png)" in report and "| gguf:F16 |" in report
    # the base's results were cached by its sha256 and are reused by the next candidate
    cache = list((recipe.parent / "runs" / ".cache" / "eval_base").glob("*.json"))
    assert len(cache) == 1 and cache[0].stem == load_recipe(recipe).base_model.sha256["model.safetensors"]
    assert mlflow.get_tracking_uri().startswith("sqlite:///")


def test_rerun_is_skipped_and_keeps_the_exit_code(honest, run_cli):
    recipe, *_ = honest
    proc = run_cli("-m", "eval_gate", str(recipe))
    assert proc.returncode == 0 and "up to date" in proc.stdout


def test_untrained_adapter_fails_perplexity_margin_and_the_gain_over_its_base(env, run_cli):
    recipe = candidate(env, "zero-adapter", "zero", golden={"min_gain_over_base": 0.1})
    proc, verdict, _ = run_gate(run_cli, recipe)
    assert proc.returncode == 1
    assert "perplexity_gain.adapter" in verdict["failed"] and "perplexity_gain.merged" in verdict["failed"]
    # a fine-tune equal to its base answers exactly what the base answers: no gain, so no reason to serve it
    gain = checks_of(verdict, "golden_gain_over_base")["adapter"]
    assert "golden_gain_over_base.adapter" in verdict["failed"] and gain["value"] == 0 and gain["gating"]
    assert checks_of(verdict, "perplexity_gain")["adapter"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert "perplexity_gain.adapter" in proc.stderr and "base: cached results" in proc.stdout


def test_gguf_with_wrong_chat_template_fails(env, run_cli):
    llama2 = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    recipe = candidate(env, "wrong-template", "trained", ggufs={"F16": {"chat_template": llama2}})
    proc, verdict, _ = run_gate(run_cli, recipe)
    assert proc.returncode == 1
    assert verdict["failed"] == ["chat_template_match.gguf:F16"]
    assert "[INST]" in checks_of(verdict, "chat_template_match")["gguf:F16"]["detail"]


def test_corrupted_quantization_fails_drift(env, run_cli):
    # a "Q8_0" whose token embedding was destroyed (written as F16 so that any llama.cpp build can run it)
    recipe = candidate(env, "broken-quant", "trained",
                       ggufs={"F16": {}, "Q8_0": {"write_as": "F16", "corrupt_tensor": "token_embd.weight"}})
    proc, verdict, _ = run_gate(run_cli, recipe)
    assert proc.returncode == 1
    assert {"kld.gguf:Q8_0", "top1_agreement.gguf:Q8_0", "ppl_ratio.gguf:Q8_0"} <= set(verdict["failed"])
    assert checks_of(verdict, "kld")["gguf:F16"]["passed"]  # the honest parent still passes
    assert checks_of(verdict, "kld")["gguf:Q8_0"]["detail"].startswith("vs gguf:F16")


def test_adapter_trained_on_canaries_fails_pii_check(env, run_cli):
    recipe = candidate(env, "canary-adapter", "canary")
    proc, verdict, out = run_gate(run_cli, recipe)
    assert proc.returncode == 1
    assert "pii_canary_leaks.adapter" in verdict["failed"]
    assert checks_of(verdict, "pii_canary_leaks")["adapter"]["value"] >= 1
    assert "PII canaries leaked" in (out / "report.md").read_text()


def test_unloadable_gguf_is_a_failed_check_naming_the_file(env, run_cli):
    recipe = candidate(env, "truncated-gguf", "trained", ggufs={"F16": {"truncate": True}})
    proc, verdict, _ = run_gate(run_cli, recipe)
    assert proc.returncode == 1
    assert verdict["failed"] == ["loads.gguf:F16"]
    detail = checks_of(verdict, "loads")["gguf:F16"]["detail"]
    assert "model-F16.gguf" in detail and "llama.cpp child" in detail
    assert "FAILED checks" in proc.stderr and "loads.gguf:F16" in proc.stderr


def test_candidate_worse_than_champion_fails(env, honest, run_cli):
    """Register a champion version in the real local MLflow store whose metric tags beat the honest candidate."""
    recipe, _, verdict, _ = honest
    from mlflow.tracking import MlflowClient

    from recipes import load_recipe
    from workbench.tracking import setup_mlflow

    r = load_recipe(recipe)
    setup_mlflow(r)
    client = MlflowClient()
    name = r.registry.model_name
    client.create_registered_model(name)
    ppl = checks_of(verdict, "perplexity")["adapter"]["value"]
    kld = checks_of(verdict, "kld")["gguf:F16"]["value"]
    tags = {"gate.passed": "true", "metric.perplexity.adapter": str(ppl / 2),  # the champion is much better here
            "metric.kld.gguf:F16": str(max(kld * 10, 1e-3)),  # the candidate is better here: not a regression (F16 drift is ~0 and jitters)
            "metric.latency_p95_ttft_ms.gguf:F16": "0.001"}  # ignored by default: machine-dependent
    champion_dir = env["root"] / "champion-model"
    champion_dir.mkdir(exist_ok=True)
    mv = client.create_model_version(name, source=champion_dir.as_uri(), tags=tags)
    client.set_registered_model_alias(name, "champion", mv.version)
    try:
        proc, v2, out = run_gate(run_cli, recipe, "--force")
        assert proc.returncode == 1
        assert v2["failed"] == ["champion_regressions"], v2["failed"]
        champ = checks_of(v2, "champion_regressions")[None]
        assert champ["value"] == 1 and "perplexity.adapter" in champ["detail"]
        assert "latency" not in champ["detail"]
        assert f"v{mv.version} (@champion)" in (out / "report.md").read_text()
    finally:
        client.delete_registered_model(name)
