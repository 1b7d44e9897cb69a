"""Registry on the embedded store: publish (all-or-nothing), approve/promote/rollback, pull + load every format.

Stage outputs are real but tiny (tests/_registry_helpers.py): a PEFT adapter of a 2-layer Llama, its merged
model, F16 + quantized GGUFs, a compressed-tensors W4A16 dir, and a verdict we write.
"""
from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from _registry_helpers import build_stages, no_tracking_env, shared_stages, subprocess_env, write_recipe

REPO = Path(__file__).resolve().parents[3]
MODEL = "reg-model"


def wb(*args: str, check: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """A registry command as `wb` runs it: in this process (fast: mlflow is imported once), or as a real
    `python -m workbench` subprocess to check the forwarding."""
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "workbench", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env=subprocess_env())
    else:
        from workbench.cli import main

        out, err = io.StringIO(), io.StringIO()
        with no_tracking_env(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
        proc = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"wb {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def publish(recipe: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "registry", "publish", str(recipe), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=subprocess_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"publish exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir):
    """Every stage built (shared with the server tests) and published once to the embedded store: v1 @candidate."""
    built = shared_stages(tmp_path_factory, tiny_model_dir)
    recipe = Path(built["recipe"])
    publish(recipe)
    reg = json.loads((built["root"] / "runs" / "reg" / "publish" / "registered.json").read_text())
    return {**built, "recipe": recipe, "registered": reg}


def client_of(recipe: Path):
    from registry.store import client_for, resolve_tracking_uri

    with no_tracking_env():
        return client_for(resolve_tracking_uri(recipe_path=str(recipe)))


def test_publish_registers_candidate_with_lineage_tags_and_verified_files(published):
    from registry.promote import file_problems
    from registry.store import alias_version

    reg, recipe = published["registered"], published["recipe"]
    assert reg["model_name"] == MODEL and reg["alias"] == "candidate"
    client = client_of(recipe)
    mv = client.get_model_version(MODEL, str(reg["version"]))
    assert alias_version(client, MODEL, "candidate") == str(reg["version"])
    tags = mv.tags
    assert tags["publish.status"] == "complete"
    assert tags["gate.passed"] == "true"
    assert float(tags["metric.golden_pass_rate"]) == pytest.approx(0.8)
    assert float(tags["metric.kld.gguf:F16"]) == pytest.approx(0.001)
    assert float(tags["metric.pii_leaks.adapter"]) == 0.0
    assert "metric.cost_note" not in tags  # non-numeric values are not metrics
    assert tags["train.run_id"] == published["train_run_id"] and tags["gate.run_id"] == published["gate_run_id"]
    assert tags["base_model"] and json.loads(tags["base_model.sha256"])
    assert len(tags["dataset.digest"]) == 64 and tags["recipe.sha256"] and tags["code.commit"]
    assert tags["lib.transformers"] and tags["lib.peft"]
    assert set(tags["quant.types"].split(",")) >= {"merged", "gguf:F16", f"gguf:{published['quant_types'][1]}"}
    assert "Eval gate: PASSED" in mv.description
    # the linked runs exist in the same store, the dataset is an input of the model
    assert client.get_run(tags["train.run_id"]).info.run_id == published["train_run_id"]
    run = client.get_run(reg["run_id"])
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"reg/clean/train", "reg/clean/eval"}
    # every file published: adapter, merged, each GGUF + Modelfile, awq, gate report, manifests
    assert file_problems(client, mv) == []
    manifest = json.loads((published["root"] / "runs" / "reg" / "publish" / "sha256.json").read_text())
    names = set(manifest["files"])
    assert {"adapter/adapter_model.safetensors", "merged/model.safetensors", "gguf/model-F16.gguf",
            "gguf/Modelfile", "gate/verdict.json", "gate/report.md", "manifests/train.json"} <= names
    assert (not published["awq"]) or "awq/model.safetensors" in names
    assert tags["files.count"] == str(len(names))
    # the embedded store keeps its artifacts inside the workspace, wherever the commands ran from
    store = (published["root"] / "runs" / "mlflow").resolve()
    assert _version_artifact_dir(client, str(reg["version"])).is_relative_to(store)
    for exp in client.search_experiments():
        if exp.name != "Default":
            assert urlparse(exp.artifact_location).path.startswith(str(store)), exp.artifact_location


def test_publish_is_skipped_when_up_to_date(published):
    proc = publish(published["recipe"])
    assert "up to date" in proc.stdout


def test_publish_refuses_failed_and_stale_verdicts(tmp_path, tiny_model_dir):
    from recipes import load_recipe
    from workbench.workspace import stage_output

    recipe = write_recipe(tmp_path, tiny_model_dir, "failing", registry={"model_name": "failing-model"})
    build_stages(recipe, tiny_model_dir, passed=False, awq=False)
    proc = publish(recipe, check=False)
    assert proc.returncode == 1
    assert "did not pass" in proc.stderr and "golden_pass_rate" in proc.stderr
    # a passing verdict that judged other candidate files than the ones on disk
    with stage_output(load_recipe(recipe), "eval_gate", force=True) as out:
        (out.dir / "verdict.json").write_text(json.dumps({"passed": True, "candidate_manifest_sha256": "0" * 64,
                                                          "checks": []}))
    proc = publish(recipe, check=False)
    assert proc.returncode == 1 and "stale verdict" in proc.stderr
    assert not (tmp_path / "runs" / "failing" / "publish").exists()
    assert not list((tmp_path / "runs" / "failing").glob(".tmp-publish-*"))


def test_promote_needs_gate_and_approval_then_rollback(published):
    recipe = str(published["recipe"])
    v1 = str(published["registered"]["version"])
    refused = wb("promote", MODEL, "--alias", "candidate", "--recipe", recipe, check=False, subprocess_=True)
    assert refused.returncode == 1 and "approval missing" in refused.stderr
    wb("approve", MODEL, "--alias", "candidate", "--by", "alice", "--recipe", recipe, subprocess_=True)
    wb("promote", MODEL, "--version", v1, "--recipe", recipe, "--by", "ci", "--reason", "first release")
    client = client_of(published["recipe"])
    from registry.store import alias_version

    assert alias_version(client, MODEL, "champion") == v1
    audit = json.loads(client.get_model_version(MODEL, v1).tags["audit.promoted"])
    assert audit["by"] == "ci" and audit["why"] == "first release" and audit["previous"] is None

    # a second candidate: gate passed but a reviewer has not approved it
    out = publish(published["recipe"], "--force").stdout
    v2 = alias_version(client, MODEL, "candidate")
    assert v2 != v1 and f"v{v2}" in out
    assert wb("promote", MODEL, "--alias", "candidate", "--recipe", recipe, check=False).returncode == 1
    # a version whose gate tag says failed is refused even when approved
    client.set_model_version_tag(MODEL, v2, "gate.passed", "false")
    wb("approve", MODEL, "--version", v2, "--by", "bob", "--recipe", recipe)
    refused = wb("promote", MODEL, "--version", v2, "--recipe", recipe, check=False)
    assert refused.returncode == 1 and "gate not passed" in refused.stderr and "approval" not in refused.stderr
    client.set_model_version_tag(MODEL, v2, "gate.passed", "true")
    wb("promote", MODEL, "--alias", "candidate", "--recipe", recipe)
    assert alias_version(client, MODEL, "champion") == v2
    assert alias_version(client, MODEL, "previous") == v1

    wb("rollback", MODEL, "--recipe", recipe, "--reason", "regression in prod")
    assert alias_version(client, MODEL, "champion") == v1
    assert alias_version(client, MODEL, "previous") is None
    assert json.loads(client.get_model_version(MODEL, v2).tags["audit.rolled_back"])["why"] == "regression in prod"
    again = wb("rollback", MODEL, "--recipe", recipe, check=False)
    assert again.returncode == 1 and "no @previous" in again.stderr


def _load_gguf_in_child(path: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom llama_cpp import Llama\n"
        "m = Llama(sys.argv[1], n_ctx=128, n_threads=1, verbose=False)\n"
        "assert m.n_vocab() == 49152, m.n_vocab()\n"
        "ids = m.tokenize(b'<|im_start|>user', special=True)\n"
        "assert ids[0] == m.tokenize(b'<|im_start|>', add_bos=False, special=True)[0]\n"
        "print('LOADED', flush=True)\n"
        "out = m.create_completion('import os', max_tokens=4, temperature=0)\n"
        "print('GENERATED', repr(out['choices'][0]['text']))\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)


def test_pull_each_format_verifies_and_loads(published, tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, uri = str(published["recipe"]), f"models:/{MODEL}@candidate"
    qtype = published["quant_types"][1]
    formats = ["adapter", "merged", f"gguf:{qtype}"] + (["awq"] if published["awq"] else [])
    for fmt in formats:
        proc = wb("pull", uri, "--format", fmt, "--dest", str(tmp_path / "serve"), "--recipe", recipe)
        assert "(verified)" in proc.stdout
    dest = tmp_path / "serve"
    launch = (dest / "launch.txt").read_text()
    ids = torch.tensor([[1, 2, 3, 4]])

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, dest / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(dest / "merged")
    a, m = with_adapter(ids).logits, merged(ids).logits
    assert torch.allclose(a, m, atol=1e-4)  # the pulled merged model is the pulled adapter on its base

    if published["awq"]:
        awq = AutoModelForCausalLM.from_pretrained(dest / "awq")
        assert torch.isfinite(awq(ids).logits).all()
        assert "compressed-tensors" in launch and "vllm serve" in launch

    gguf = dest / "gguf" / f"model-{qtype}.gguf"
    assert "llama-server -m" in launch and "ollama create" in launch
    assert f"FROM ./model-{qtype}.gguf" in (dest / "gguf" / "Modelfile").read_text()
    adapter_launch = wb("pull", uri, "--format", "adapter", "--dest", str(tmp_path / "a"), "--recipe", recipe).stdout
    assert "--enable-lora" in adapter_launch and "--lora-modules" in adapter_launch
    missing = wb("pull", uri, "--format", "gguf:Q2_K", "--dest", str(tmp_path / "x"), "--recipe", recipe, check=False)
    assert missing.returncode == 1 and "has no gguf:Q2_K" in missing.stderr

    child = _load_gguf_in_child(gguf)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "GENERATED" in child.stdout


def _version_artifact_dir(client, version: str) -> Path:
    from registry.store import logged_model_id

    lm = client.get_logged_model(logged_model_id(client.get_model_version(MODEL, version)))
    return Path(urlparse(lm.artifact_location).path)


def test_tampered_or_pickled_files_are_refused(published, tmp_path):
    recipe = str(published["recipe"])
    client = client_of(published["recipe"])
    v = str(published["registered"]["version"])
    store = _version_artifact_dir(client, v)
    target = store / "merged" / "model.safetensors"
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-4] + b"\x00\x00\x00\x01")
        proc = wb("pull", f"models:/{MODEL}/{v}", "--format", "merged", "--dest", str(tmp_path / "d"),
                  "--recipe", recipe, check=False)
        assert proc.returncode == 1 and "merged/model.safetensors: sha256 mismatch" in proc.stderr
        assert not (tmp_path / "d" / "merged").exists()  # nothing unverified lands in DEST
        client.set_model_version_tag(MODEL, v, "approval", "approved")
        client.set_model_version_tag(MODEL, v, "approved_by", "alice")
        proc = wb("promote", MODEL, "--version", v, "--recipe", recipe, check=False)
        assert proc.returncode == 1 and "files do not verify" in proc.stderr and "sha256 mismatch" in proc.stderr
    finally:
        target.write_bytes(original)
    # a pickle slipped into the store next to the adapter: not in the manifest, and a pickle
    import torch

    torch.save({"x": torch.zeros(2)}, store / "adapter" / "extra.bin")
    try:
        proc = wb("pull", f"models:/{MODEL}/{v}", "--format", "adapter", "--dest", str(tmp_path / "p"),
                  "--recipe", recipe, check=False)
        assert proc.returncode == 1 and "adapter/extra.bin: not in the sha256 manifest" in proc.stderr
    finally:
        (store / "adapter" / "extra.bin").unlink()


def test_pickle_listed_in_a_manifest_is_still_refused(tmp_path):
    import torch

    from registry.files import verify_files
    from workbench.workspace import sha256_file

    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    (tmp_path / "fake.safetensors").write_bytes(b"\x80\x04" + b"\x00" * 30)
    files = {n: {"size": (tmp_path / n).stat().st_size, "sha256": sha256_file(tmp_path / n)}
             for n in ("weights.pt", "fake.safetensors")}
    problems = verify_files(tmp_path, files)
    assert any("weights.pt: pickle-format file refused" in p for p in problems)
    assert any("fake.safetensors: not a safetensors file" in p for p in problems)


def test_killed_publish_leaves_no_usable_version(published):
    """SIGKILL a publish mid-upload: no new complete version, @candidate unchanged, promote refuses the rest."""
    from registry.store import alias_version

    recipe = published["recipe"]
    client = client_of(recipe)
    before = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}
    candidate = alias_version(client, MODEL, "candidate")
    proc = subprocess.Popen([sys.executable, "-m", "registry", "publish", str(recipe), "--force"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=subprocess_env())
    for line in proc.stdout:
        if line.startswith("publish: uploading [2/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "publish finished before it could be killed"

    after = client.search_model_versions(f"name = '{MODEL}'")
    new = [v for v in after if v.version not in before]
    assert all(v.tags.get("publish.status") != "complete" for v in new)
    assert alias_version(client, MODEL, "candidate") == candidate
    for v in new:  # if the kill landed after registration, the version is unusable
        refused = wb("promote", MODEL, "--version", str(v.version), "--recipe", str(recipe), check=False)
        assert refused.returncode == 1 and "publish incomplete" in refused.stderr
    from registry.publish import pending_logged_models

    pending = pending_logged_models(client, client.get_experiment_by_name("reg").experiment_id)
    assert pending, "the interrupted upload's LoggedModel should still be PENDING"
    # the next publish marks the interrupted upload FAILED and registers a complete version
    publish(recipe, "--force")
    for lm in pending:
        assert str(client.get_logged_model(lm.model_id).status).endswith("FAILED")
    assert client.get_model_version_by_alias(MODEL, "candidate").tags["publish.status"] == "complete"
    assert not list((published["root"] / "runs" / "reg").glob(".tmp-publish-*"))


def test_model_uris_and_tracking_uris_in_outputs():
    from registry.publish import redact
    from registry.store import parse_model_uri
    from workbench.workspace import StageError

    assert parse_model_uri("models:/stdlib-assistant@champion") == ("stdlib-assistant", None, "champion")
    assert parse_model_uri("models:/stdlib-assistant/12") == ("stdlib-assistant", "12", None)
    for bad in ("runs:/abc/model", "models:/name", "models:/name/latest", "models:/@champion"):
        with pytest.raises(StageError, match="expected models:/NAME@ALIAS"):
            parse_model_uri(bad)
    assert redact("https://bob:s3cret@mlflow.example.com/") == "https://mlflow.example.com/"
    assert redact("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
