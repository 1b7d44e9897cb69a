"""The gate's endpoint engine: what a down, slow, rate-limited or malformed endpoint gives (a clear error naming it,
after bounded retries; never an answer), and, on a real server of the tiny GGUF, the same greedy answers and golden
verdicts as the gate's in-process llama.cpp on the same file."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from _eval_gate_helpers import make_peaked_tiny_llama, write_llama_gguf

GOLDEN = [
    {"id": "m-json", "prompt": "Which module parses JSON?", "expect": [{"type": "contains", "values": ["json"]}]},
    {"id": "m-re", "prompt": "Which module handles regular expressions?", "expect": [{"type": "regex", "pattern": r"\bre\b"}]},
    {"id": "short", "prompt": "Say hello in one word.", "critical": True, "expect": [{"type": "max_tokens", "value": 6}]},
    {"id": "os", "prompt": "What does os.path.join do?", "expect": [{"type": "contains", "values": ["path"]}]},
]


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def chunk(text: str | None, finish: str | None = None) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}]}


class Fake:
    """A tiny HTTP server whose reply to each chat request is the next entry of `script`."""

    def __init__(self, script: list):
        self.script, self.calls = list(script), 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.calls += 1
                kind, *rest = fake.script.pop(0) if fake.script else ("ok",)
                if kind == "sleep":
                    time.sleep(rest[0])
                    kind = "ok"
                if kind == "ok":
                    body, status, ctype, headers = sse(chunk("json is the module"), chunk(None, "stop")), 200, \
                        "text/event-stream", {}
                elif kind == "status":
                    body, status, ctype, headers = json.dumps({"error": {"message": rest[1]}}).encode(), rest[0], \
                        "application/json", rest[2] if len(rest) > 2 else {}
                elif kind == "garbage":
                    body, status, ctype, headers = b"data: {not json\n\n", 200, "text/event-stream", {}
                else:  # html: a proxy's error page with status 200
                    body, status, ctype, headers = b"<html>gateway</html>", 200, "text/html", {}
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout case)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()


def spec(url: str, **kw):
    from recipes.sections.eval_gate import EndpointSpec

    return EndpointSpec(**{"name": "api", "base_url": url, "model": "m", "usd_per_million_input": 0.1,
                           "usd_per_million_output": 0.4, "max_retries": 2, "timeout_s": 5, **kw})


def ask(endpoint_spec):
    from eval_gate.endpoints import EndpointEngine

    return EndpointEngine(endpoint_spec, backoff_s=0.01).chat([{"role": "user", "content": "hi"}], 8)


@pytest.mark.parametrize("script, calls, message", [
    ([("status", 429, "slow down", {"Retry-After": "0"})] * 3, 3, r"rate-limited \(HTTP 429\): .*slow down.*gave up after 3"),
    ([("status", 503, "overloaded")] * 3, 3, "HTTP 503: .*overloaded"),
    ([("garbage",)] * 3, 3, "malformed reply"),
    ([("html",)] * 3, 3, "malformed reply: the reply held no chat completion chunk"),
    ([("status", 401, "bad key")], 1, "HTTP 401: .*bad key"),  # permanent: not retried
    ([("status", 404, "no such model")], 1, "HTTP 404"),
    ([("sleep", 3)] * 3, 3, "timed out"),
])
def test_failing_endpoint_is_an_error_naming_it_after_bounded_retries(script, calls, message):
    from eval_gate.endpoints import EndpointError

    fake = Fake(script)
    try:
        with pytest.raises(EndpointError, match=message) as err:
            ask(spec(fake.url, timeout_s=1 if script[0][0] == "sleep" else 5))
        assert f"endpoint 'api' ({fake.url}, model 'm')" in str(err.value)
        assert fake.calls == calls
    finally:
        fake.close()


def test_transient_failure_then_an_answer_and_a_down_endpoint():
    from eval_gate.endpoints import EndpointError
    from workbench.serving import free_port

    fake = Fake([("status", 429, "wait", {"Retry-After": "0"}), ("status", 502, "bad gateway")])
    try:
        assert ask(spec(fake.url)).text == "json is the module" and fake.calls == 3
    finally:
        fake.close()
    down = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match=r"cannot connect: .*gave up after 3 attempts"):
        ask(spec(down))


def test_recipe_names_the_key_variable_never_the_key():
    from pydantic import ValidationError

    from recipes.sections.eval_gate import EvalGateSection

    for bad, msg in (({"api_key_env": "sk-proj-abc123"}, "looks like an API key"),
                     ({"base_url": "ftp://x"}, "expected an http"),
                     ({"base_url": "http://api.example.com/v1", "api_key_env": "API_KEY"}, "unencrypted"),
                     ({"name": "bad name"}, "pattern")):
        with pytest.raises(ValidationError, match=msg):
            spec("https://api.example.com/v1", **bad)
    with pytest.raises(ValidationError, match="repeated"):
        EvalGateSection(endpoints=[spec("https://a.example/v1"), spec("https://b.example/v1")])
    with pytest.raises(ValidationError, match="enabled is false"):
        EvalGateSection(load={"max_p95_ttft_ms": 500})
    assert "endpoints" not in EvalGateSection().model_dump()  # unused: the section hashes as before


def test_break_even_against_capacity():
    from eval_gate.checks import cost
    from eval_gate.endpoints import break_even

    # the report's old figures: a $0.10/h machine against $0.20/1M tokens breaks even at 12M tokens/day, but 40
    # tokens/s serve 3.5M a day: it never breaks even
    c = cost(40.0, 0.10, 0.20)
    assert c["break_even_tokens_per_day"] == pytest.approx(12e6) and c["capacity_tokens_per_day"] == pytest.approx(3.456e6)
    assert c["breaks_even"] is False
    be = break_even(0.10, 0.20, 400.0)
    assert be["breaks_even"] is True and be["capacity_tokens_per_day"] == pytest.approx(34.56e6)


# ---- the engine against a real server of a real GGUF ---------------------------------------------------------------

@pytest.fixture(scope="module")
def served_gguf(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("endpoint-parity")
    tiny = make_peaked_tiny_llama(root / "tiny", smollm2_dir)
    (tiny / "chat_template.jinja").write_text(_chatml())
    return write_llama_gguf(tiny, root / "model-F16.gguf")


def _chatml() -> str:
    return ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("engine", ["llama-server", "llama-cpp-python"])
def test_endpoint_engine_gives_the_in_process_answers_and_verdicts(served_gguf, tmp_path, engine):
    """Greedy through the server, greedy in the gate's llama.cpp child: identical text, so identical verdicts."""
    from eval_gate.endpoints import EndpointEngine
    from eval_gate.engines import run_gguf
    from eval_gate.golden import GoldenCase, score_golden
    from workbench.llama_server import installed_binary
    from workbench.serving import Server, ServeSpec, free_port

    if engine == "llama-server" and installed_binary() is None:
        pytest.skip("llama-server is not built (make install builds it)")
    cases = [GoldenCase.model_validate(g) for g in GOLDEN]
    convs = [c.messages() for c in cases]
    ref = run_gguf(served_gguf, "ref", {"threads": 1, "n_ctx": 512, "records": [],
                                        "chats": {"golden": {"conversations": convs, "max_new_tokens": 24}}},
                   tmp_path / "ref", 300).answers["golden"]
    srv_spec = ServeSpec(model=served_gguf, name="tiny", port=free_port(), threads=1, n_ctx=512)  # 4 slots
    with Server(srv_spec, engine, tmp_path / "server.log"):
        eng = EndpointEngine(spec(srv_spec.base_url, model="tiny"))
        answers = [eng.chat(c, 24).text for c in convs]
    # The one stated tolerance: a token that is a lone byte of a multi-byte character (random weights emit such
    # tokens; a trained model rarely does) is dropped by llama-cpp-python's decoder and sent as U+FFFD by
    # llama-server. The token ids are the same; only how an invalid byte is spelled differs.
    assert [a.replace("\ufffd", "") for a in answers] == [a.replace("\ufffd", "") for a in ref]
    assert any(a for a in answers)  # the comparison is not between empty strings
    count = len  # token counts only matter for max_tokens; the same function on both sides
    assert [c.status for c in score_golden(cases, answers, count).cases] == \
        [c.status for c in score_golden(cases, ref, count).cases]


def test_a_gating_endpoint_that_failed_fails_the_comparison_and_a_scored_one_compares_pass_rates():
    from types import SimpleNamespace

    from eval_gate.endpoints import EndpointEval, endpoint_checks
    from recipes.sections.eval_gate import EvalGateSection

    recipe = SimpleNamespace(eval_gate=EvalGateSection(endpoints=[
        spec("https://a.example/v1", name="up", must_be_within=0.05),
        spec("https://b.example/v1", name="down", must_be_within=0.05)]))
    golden = lambda rate: SimpleNamespace(pass_rate=rate, critical_failures=[])  # noqa: E731
    evaluation = SimpleNamespace(
        artifacts={"adapter": SimpleNamespace(error=None, golden=golden(0.60)),
                   "gguf:Q8_0": SimpleNamespace(error=None, golden=golden(0.70))},
        endpoints={"up": EndpointEval("up", "m", "https://a.example/v1", golden=golden(0.70), ttft_ms=[1.0]),
                   "down": EndpointEval("down", "m", "https://b.example/v1", error="endpoint 'down': HTTP 503")})
    checks = {c.metric: c for c in endpoint_checks(recipe, evaluation)}
    assert not checks["golden_within_up.adapter"].passed and checks["golden_within_up.adapter"].gating
    assert checks["golden_within_up.adapter"].value == pytest.approx(-0.10)
    assert checks["golden_within_up.gguf:Q8_0"].passed
    failed = checks["golden_within_down.adapter"]
    assert failed.gating and not failed.passed and failed.value is None and "HTTP 503" in failed.detail
    assert not checks["endpoint_answered.down"].gating
