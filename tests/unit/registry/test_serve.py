"""`wb serve` of a published tiny model: the real `openai` client lists it (with its lineage) and gets a chat
completion; Ctrl-C stops it; a tampered file in the store makes it refuse to start; binding beyond loopback needs
the flag and a key; the key appears in no output."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from _registry_helpers import copy_stages, derive_recipe, no_tracking_env, shared_stages, subprocess_env

REPO = Path(__file__).resolve().parents[3]
MODEL = "serve-model"
KEY_ENV = "WB_TEST_SERVE_KEY"


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir):
    """The shared tiny stage outputs, published to a store of this module's own: v1 under @candidate."""
    built = shared_stages(tmp_path_factory, tiny_model_dir)
    root = tmp_path_factory.mktemp("serve")
    copy_stages(built["root"], root)
    recipe = derive_recipe(Path(built["recipe"]), root, registry={"model_name": MODEL})
    proc = subprocess.run([sys.executable, "-m", "registry", "publish", str(recipe)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"recipe": recipe, "root": root, "qtype": built["quant_types"][1]}


def free_port() -> int:
    from workbench.serving import free_port as fp

    return fp()


def start_serve(published, port: int, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = published["root"] / f"serve-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "serve", f"models:/{MODEL}@candidate", "--format",
                             f"gguf:{published['qtype']}", "--port", str(port), "--threads", "1",
                             "--recipe", str(published["recipe"]), *extra],
                            cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=subprocess_env(**(env or {})))
    return proc, log


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = log.read_text(errors="replace")
        if text in out:
            return out
        if proc.poll() is not None:
            raise AssertionError(f"wb serve exited {proc.returncode} before {text!r}:\n{out[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def manifest_sha(published, rel: str) -> str:
    """The sha256 the version's published manifest gives for rel."""
    import tempfile

    from registry.promote import load_sha_manifest
    from registry.store import client_for, resolve_tracking_uri

    with no_tracking_env(), tempfile.TemporaryDirectory() as tmp:
        client = client_for(resolve_tracking_uri(recipe_path=str(published["recipe"])))
        mv = client.get_model_version_by_alias(MODEL, "candidate")
        return load_sha_manifest(client, mv, Path(tmp))["files"][rel]["sha256"]


@pytest.mark.parametrize("engine", ["llama-server", "llama-cpp-python"])
def test_serve_answers_the_openai_client_and_stops_on_ctrl_c(published, engine):
    import openai

    from workbench.llama_server import installed_binary

    if engine == "llama-server" and installed_binary() is None:
        pytest.skip("llama-server is not built (make install builds it)")
    key = "k-" + secrets.token_urlsafe(24)
    port = free_port()
    proc, log = start_serve(published, port, "--engine", engine, "--api-key-env", KEY_ENV, env={KEY_ENV: key})
    try:
        out = wait_for_line(proc, log, "Ctrl-C stops it")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == [MODEL]
        sha = manifest_sha(published, f"gguf/model-{published['qtype']}.gguf")
        tags = set(models[0].model_extra["tags"])
        assert {f"model={MODEL}", "version=1", f"sha256={sha}", "gate_passed=true"} <= tags
        assert f"sha256 {sha} (verified against the version's sha256.json)" in out and f"{MODEL} v1 (models:/{MODEL}@candidate" in out
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What does os do?"}],
                                               max_tokens=8, temperature=0)
        assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
        assert_gate_engine_parity(published, port, key)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C on the terminal sends
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text(errors="replace")
    assert "serve: stopped" in out and "removed the temporary pull" in out
    with pytest.raises(openai.APIConnectionError):  # nothing is left listening
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=5).models.list()
    assert key not in out


def assert_gate_engine_parity(published, port: int, key: str) -> None:
    """The gate's endpoint engine on the served file answers what the gate's in-process llama.cpp answers on the
    same file (greedy both ways). Stated tolerance: an invalid UTF-8 byte is dropped by llama-cpp-python and sent as
    U+FFFD by llama-server; this random-weight model emits such bytes, a trained one rarely does."""
    from eval_gate.endpoints import EndpointEngine
    from eval_gate.engines import run_gguf
    from recipes.sections.eval_gate import EndpointSpec

    convs = [[{"role": "user", "content": q}] for q in ("Which module parses JSON?", "What does os.path.join do?")]
    gguf = _store_file(published, f"gguf/model-{published['qtype']}.gguf")
    ref = run_gguf(gguf, "ref", {"threads": 1, "n_ctx": 1024, "records": [],
                                 "chats": {"golden": {"conversations": convs, "max_new_tokens": 16}}},
                   published["root"] / f"ref-{port}", 300).answers["golden"]
    os.environ[KEY_ENV] = key
    try:
        engine = EndpointEngine(EndpointSpec(name="served", base_url=f"http://127.0.0.1:{port}/v1", model=MODEL,
                                             api_key_env=KEY_ENV, usd_per_million_input=0, usd_per_million_output=0))
        answers = [engine.chat(c, 16).text for c in convs]
    finally:
        os.environ.pop(KEY_ENV, None)
    assert [a.replace("\ufffd", "") for a in answers] == [a.replace("\ufffd", "") for a in ref] and any(ref)


def _store_file(published, rel: str) -> Path:
    from registry.store import client_for, logged_model_id, resolve_tracking_uri

    with no_tracking_env():
        client = client_for(resolve_tracking_uri(recipe_path=str(published["recipe"])))
        mv = client.get_model_version_by_alias(MODEL, "candidate")
        lm = client.get_logged_model(logged_model_id(mv))
    return Path(urlparse(lm.artifact_location).path) / rel


def test_a_killed_serve_leaves_no_server_behind(published):
    import openai

    port = free_port()
    proc, log = start_serve(published, port)
    try:
        wait_for_line(proc, log, "Ctrl-C stops it")
        proc.kill()  # SIGKILL: no chance to stop the server itself
        proc.wait(timeout=30)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=5)
        deadline = time.time() + 30
        while time.time() < deadline:  # the server got SIGTERM when its parent died; it may take a moment to exit
            try:
                client.models.list()
            except openai.APIConnectionError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the server outlived the killed wb serve")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tampered_file_in_the_store_refuses_to_start(published):
    target = _store_file(published, f"gguf/model-{published['qtype']}.gguf")
    original = target.read_bytes()
    port = free_port()
    try:
        target.write_bytes(original[:-8] + b"\x00" * 8)
        proc, log = start_serve(published, port)
        assert proc.wait(timeout=300) == 1
    finally:
        target.write_bytes(original)
    out = log.read_text(errors="replace")
    assert "refused, files do not verify" in out and "sha256 mismatch" in out
    assert "Ctrl-C stops it" not in out


def test_beyond_loopback_needs_the_flag_and_a_key_and_vllm_needs_vllm(published, monkeypatch):
    from workbench.cli import main

    base = ["serve", f"models:/{MODEL}@candidate", "--format", f"gguf:{published['qtype']}", "--recipe",
            str(published["recipe"])]

    def run(*extra: str) -> tuple[int, str]:
        import contextlib
        import io

        err = io.StringIO()
        with no_tracking_env(), contextlib.redirect_stderr(err):
            rc = main(base + list(extra))
        return rc, err.getvalue()

    rc, err = run("--host", "0.0.0.0")
    assert rc == 1 and "needs --allow-remote" in err
    rc, err = run("--host", "0.0.0.0", "--allow-remote")
    assert rc == 1 and "an API key is required" in err
    monkeypatch.delenv(KEY_ENV, raising=False)
    rc, err = run("--host", "0.0.0.0", "--allow-remote", "--api-key-env", KEY_ENV)
    assert rc == 1 and f"{KEY_ENV} is unset or empty" in err
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        rc, err = run("--engine", "vllm")
        assert rc == 1 and "--engine vllm serves merged, awq, adapter" in err
        rc, err = run("--engine", "vllm", "--format", "merged")
        assert rc == 1 and "vLLM is not installed" in err and "CUDA GPU" in err
