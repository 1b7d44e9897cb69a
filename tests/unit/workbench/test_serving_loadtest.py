"""The load test against a real server on 127.0.0.1 (a tiny GGUF behind llama.cpp's server), through the real
`openai` client: figures for every level and no errors; a server killed mid-run gives errors, not a hang."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [[{"role": "user", "content": f"What does the {m} module do?"}] for m in ("os", "re", "json", "csv")]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    from transformers import AutoModelForCausalLM

    from _registry_helpers import write_llama_gguf

    path = tmp_path_factory.mktemp("serving") / "tiny-F16.gguf"
    write_llama_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path)
    return path


def engine_or_skip() -> str:
    from workbench.llama_server import installed_binary

    return "llama-server" if installed_binary() is not None else "llama-cpp-python"


def spec_for(path: Path, **kw):
    from workbench.serving import ServeSpec, free_port

    return ServeSpec(model=path, name="tiny", port=free_port(), threads=1, n_ctx=512, **kw)


def test_loadtest_cli_reports_every_level_without_errors(tiny_gguf, tmp_path):
    from workbench.serving import Server

    spec = spec_for(tiny_gguf, parallel=4)
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps({"id": f"g{i}", "prompt": p[0]["content"],
                                          "expect": [{"type": "max_tokens", "value": 100}]}) + "\n"
                              for i, p in enumerate(PROMPTS)))
    with Server(spec, engine_or_skip(), tmp_path / "server.log"):
        proc = subprocess.run([sys.executable, "-m", "workbench", "loadtest", spec.base_url, "--model", "tiny",
                               "--levels", "1,4", "--requests", "8", "--max-tokens", "12", "--golden", str(golden),
                               "--out", str(tmp_path / "lt")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    levels = json.loads((tmp_path / "lt" / "loadtest.json").read_text())[0]["levels"]
    assert [lv["clients"] for lv in levels] == [1, 4]
    for lv in levels:
        assert lv["requests"] == 8 and lv["errors"] == 0
        assert 0 < lv["ttft_p50_ms"] <= lv["ttft_p95_ms"] <= lv["ttft_p99_ms"]
        assert 0 < lv["e2e_p50_s"] <= lv["e2e_p95_s"] and lv["tokens_per_s"] > 0 and lv["output_tokens"] > 0
    assert (tmp_path / "lt" / "loadtest.png").stat().st_size > 0
    assert "| 4 | 8 | 0 |" in proc.stdout


def test_a_server_killed_mid_run_gives_errors_not_a_hang(tiny_gguf, tmp_path):
    from workbench.loadtest import loadtest
    from workbench.serving import Server

    spec = spec_for(tiny_gguf, parallel=2)
    srv = Server(spec, engine_or_skip(), tmp_path / "server.log").start()
    done: list = []

    def run():
        done.append(loadtest(spec.base_url, "tiny", PROMPTS, levels=[2], requests=2000, max_seconds=120,
                             max_tokens=32, timeout=10))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    # kill it once it has answered (llama-server logs each answer's timings): the streams in flight break, and
    # every request after that is refused
    log, waited = tmp_path / "server.log", 0.0
    while waited < 60 and "print_timing" not in log.read_text(errors="replace") and t.is_alive():
        time.sleep(0.1)
        waited += 0.1
    srv.proc.send_signal(signal.SIGKILL)
    t.join(timeout=180)
    srv.stop()
    assert not t.is_alive(), "the load test hung on a dead server"
    lv = done[0].levels[0]
    assert lv.errors > 0 and lv.requests == 2000, lv
    assert any("Connect" in e or "connect" in e for e in lv.error_samples), lv.error_samples


def test_only_loopback_is_load_tested_and_levels_are_checked():
    from workbench.loadtest import check_loopback, loadtest, percentile
    from workbench.workspace import StageError

    with pytest.raises(StageError, match="only loads servers on this machine"):
        check_loopback("https://api.openai.com/v1")
    check_loopback("http://127.0.0.1:8080/v1")
    check_loopback("http://localhost:8080/v1")
    with pytest.raises(StageError, match="must be >= 1"):
        loadtest("http://127.0.0.1:9/v1", "m", PROMPTS, levels=[0])
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 95) == 5.0


def test_bind_rules_and_keys_stay_in_the_environment(tmp_path, monkeypatch):
    from workbench.serving import ServeSpec, check_bind, command
    from workbench.workspace import StageError

    check_bind("127.0.0.1", False, None)
    check_bind("::1", False, None)
    for host, allow, env, msg in (("0.0.0.0", False, None, "needs --allow-remote"),
                                  ("10.1.2.3", True, None, "an API key is required"),
                                  ("0.0.0.0", True, "WB_NO_SUCH_VAR", "unset or empty")):
        with pytest.raises(StageError, match=msg):
            check_bind(host, allow, env)
    monkeypatch.setenv("WB_SERVE_KEY", "s3cret-value")
    spec = ServeSpec(model=tmp_path / "m.gguf", name="m", api_key_env="WB_SERVE_KEY")
    argv, env = command(spec, "llama-cpp-python")
    assert "s3cret-value" not in " ".join(argv) and "WB_SERVE_KEY" in argv
    from workbench.llama_server import installed_binary

    if installed_binary() is not None:
        argv, env = command(spec, "llama-server")
        assert "s3cret-value" not in " ".join(argv) and env["LLAMA_API_KEY"] == "s3cret-value"
        assert argv[argv.index("--flash-attn") + 1] == "off"
