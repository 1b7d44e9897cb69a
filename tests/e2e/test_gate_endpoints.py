"""The gate with endpoints and the load check, as users run it (`python -m eval_gate RECIPE`): a server of the base
standing in for "the API" (with an API key), and an endpoint that is down. The served one is scored beside the
candidate and gates it (must_be_within); the down one is reported with its error, not scored; the candidate's GGUF
is load-tested behind llama-server; and the API key appears in no output, log or MLflow record.

Tiny in-process models (tests/_eval_gate_helpers.py), but a real gate run and two real servers: about a minute.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from _eval_gate_helpers import (CANARIES, GATE, GOLDEN, REDTEAM, build_candidate, checks_of, domain_text,
                                make_peaked_tiny_llama, train_lora, write_jsonl, write_llama_gguf, write_recipe)
from conftest import REPO


KEY_ENV = "WB_TEST_GATE_API_KEY"


@pytest.fixture(scope="module")
def gated(tmp_path_factory, smollm2_dir):
    from workbench.llama_server import installed_binary
    from workbench.serving import Server, ServeSpec, free_port

    if installed_binary() is None:
        pytest.skip("llama-server is not built (make install builds it)")
    root = tmp_path_factory.mktemp("gate-endpoints")
    tiny = make_peaked_tiny_llama(root / "tiny", smollm2_dir)
    adapter = train_lora(tiny, root / "adapter", [domain_text(i) for i in range(16)], steps=30)
    base_gguf = write_llama_gguf(tiny, root / "base-F16.gguf", chat_template=_adapter_template(adapter))
    key = "k-" + secrets.token_urlsafe(24)
    api = ServeSpec(model=base_gguf, name="tiny-base", port=free_port(), threads=1, n_ctx=512, api_key_env=KEY_ENV)
    gate = json.loads(json.dumps(GATE))
    gate["safety"].update({"redteam": str(write_jsonl(root / "redteam.jsonl", REDTEAM)),
                           "canaries": str(write_jsonl(root / "canaries.jsonl", CANARIES))})
    gate["endpoints"] = [
        {"name": "api", "base_url": api.base_url, "model": "tiny-base", "api_key_env": KEY_ENV,
         "usd_per_million_input": 0.15, "usd_per_million_output": 0.6, "must_be_within": 1.0},
        {"name": "down", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "gone",
         "usd_per_million_input": 1.0, "usd_per_million_output": 2.0, "max_retries": 1, "timeout_s": 5},
    ]
    gate["load"] = {"enabled": True, "concurrency": 2, "requests": 6, "max_p95_ttft_ms": 600000}
    recipe = write_recipe(root, "served", tiny, data={"golden": str(write_jsonl(root / "golden.jsonl", GOLDEN))},
                          eval_gate=gate)
    build_candidate(recipe, adapter, ggufs={"F16": {}})
    os.environ[KEY_ENV] = key  # the server and the gate read it from the environment, as in CI
    try:
        with Server(api, "llama-server", root / "api-server.log"):
            proc = subprocess.run([sys.executable, "-m", "eval_gate", str(recipe)], cwd=REPO, capture_output=True,
                                  text=True, timeout=900)
    finally:
        os.environ.pop(KEY_ENV, None)
    out = root / "runs" / "served" / "eval_gate"
    assert (out / "verdict.json").is_file(), f"no verdict (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return {"recipe": recipe, "proc": proc, "out": out, "key": key, "root": root,
            "verdict": json.loads((out / "verdict.json").read_text())}


def _adapter_template(adapter: Path) -> str:
    return (adapter / "chat_template.jinja").read_text()


def test_endpoint_is_scored_beside_the_candidate_and_gates_it(gated):
    v, proc = gated["verdict"], gated["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = next(e for e in v["endpoints"] if e["name"] == "api")
    assert api["error"] is None and 0.0 <= api["golden_pass_rate"] <= 1.0 and api["completion_tokens"] > 0
    assert api["cost_usd"] > 0
    within = checks_of(v, "golden_within_api")
    assert set(within) >= {"adapter", "merged", "gguf:F16"} and all(c["gating"] and c["passed"] for c in within.values())
    assert checks_of(v, "endpoint_golden_pass_rate")["api"]["value"] == pytest.approx(api["golden_pass_rate"])
    report = (gated["out"] / "report.md").read_text()
    assert "## Endpoints beside the candidate" in report and "| api | tiny-base (gated: within 1.00) |" in report
    assert "## Cost: self-hosting against each endpoint" in report and "breaks even?" in report


def test_a_down_endpoint_is_an_error_naming_it_never_a_score(gated):
    v = gated["verdict"]
    down = next(e for e in v["endpoints"] if e["name"] == "down")
    assert "golden_pass_rate" not in down
    assert "endpoint 'down'" in down["error"] and "cannot connect" in down["error"] and "2 attempts" in down["error"]
    answered = checks_of(v, "endpoint_answered")["down"]
    assert not answered["passed"] and not answered["gating"]
    assert "**down** was not scored" in (gated["out"] / "report.md").read_text()
    assert "endpoint down: " in gated["proc"].stdout


def test_latency_under_load_is_a_check(gated):
    v = gated["verdict"]
    load = v["load"]
    assert load["engine"] == "llama-server" and load["concurrency"] == 2 and load["error"] is None
    assert load["level"]["requests"] == 6 and load["level"]["errors"] == 0
    p95 = checks_of(v, "latency_load_p95_ttft_ms")["gguf:F16"]
    assert p95["gating"] and p95["passed"] and p95["value"] == pytest.approx(load["level"]["ttft_p95_ms"])
    assert checks_of(v, "tokens_per_s_load")["gguf:F16"]["value"] > 0
    assert "## Latency under load (gguf:F16 behind llama-server, 2 clients" in (gated["out"] / "report.md").read_text()


def test_the_api_key_is_in_no_output_log_or_mlflow_record(gated):
    from mlflow.tracking import MlflowClient

    from recipes import load_recipe
    from workbench.tracking import setup_mlflow

    key = gated["key"]
    assert key not in gated["proc"].stdout + gated["proc"].stderr
    for p in list(gated["root"].rglob("*")):
        if p.is_file() and p.suffix not in (".safetensors", ".gguf", ".arrow"):
            assert key.encode() not in p.read_bytes(), p
    manifest = json.loads((gated["out"] / "manifest.json").read_text())
    setup_mlflow(load_recipe(gated["recipe"]))
    run = MlflowClient().get_run(manifest["results"]["mlflow_run_id"])
    record = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": run.data.metrics})
    assert key not in record and KEY_ENV not in json.dumps(run.data.params)
    assert "api-server.log" in {p.name for p in gated["root"].iterdir()}  # the server's own log was searched too


@pytest.mark.e2e
def test_served_smollm2_answers_the_golden_set_as_the_gate_does(tmp_path):
    """Real text: the SmolLM2 GGUF behind wb serve's default server, through the gate's endpoint engine, against the
    gate's in-process llama.cpp on the same file: the same greedy answers, character for character."""
    from eval_gate.endpoints import EndpointEngine
    from eval_gate.engines import run_gguf
    from eval_gate.golden import load_golden, score_golden
    from recipes.sections.eval_gate import EndpointSpec
    from workbench.base import smollm2_gguf_path
    from workbench.llama_server import installed_binary
    from workbench.serving import Server, ServeSpec, free_port

    if installed_binary() is None:
        pytest.skip("llama-server is not built (make install builds it)")
    cases = load_golden(REPO / "demo" / "golden" / "stdlib.jsonl")[:8]
    convs = [c.messages() for c in cases]
    gguf = smollm2_gguf_path()
    ref = run_gguf(gguf, "ref", {"threads": 1, "n_ctx": 2048, "records": [],
                                 "chats": {"golden": {"conversations": convs, "max_new_tokens": 48}}},
                   tmp_path / "ref", 600).answers["golden"]
    spec = ServeSpec(model=gguf, name="smollm2", port=free_port(), threads=1)  # wb serve's defaults: 4 slots
    with Server(spec, "llama-server", tmp_path / "server.log"):
        engine = EndpointEngine(EndpointSpec(name="served", base_url=spec.base_url, model="smollm2",
                                             usd_per_million_input=0, usd_per_million_output=0))
        answers = [engine.chat(c, 48).text for c in convs]
    assert answers == ref
    count = len
    assert [c.status for c in score_golden(cases, answers, count).cases] == \
        [c.status for c in score_golden(cases, ref, count).cases]
