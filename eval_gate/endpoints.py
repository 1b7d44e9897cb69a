"""OpenAI-compatible endpoints in the gate: the API the candidate would replace, judged on the same sets.

Each `eval_gate.endpoints` entry answers the golden, red-team and over-refusal prompts through the real `openai`
client (chat completions, streaming, temperature 0, one request at a time so that latency is the unloaded
figure). A request that fails for a transient reason (no connection, timeout, 429, 5xx, a malformed reply) is
retried a bounded number of times; a permanent refusal (401, 403, 404, 400) is not. Either way an endpoint that
cannot answer every prompt gets an error naming the endpoint, its URL and what failed: it is never scored as if
it had answered nothing, and a gating comparison with it fails.

The API key is read from the environment variable the recipe names, and never written anywhere.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from recipes import Recipe
from workbench.workspace import StageError

from . import checks as C
from .golden import GoldenSummary, is_refusal, score_golden


class EndpointError(StageError):
    pass


@dataclass
class Answer:
    text: str
    ttft_ms: float
    tokens_per_s: float
    prompt_tokens: int | None
    completion_tokens: int


@dataclass
class EndpointEval:
    name: str
    model: str
    base_url: str
    golden: GoldenSummary | None = None
    redteam_answers: list[str] = field(default_factory=list)
    overrefusal_answers: list[str] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = True  # False: some token counts came from the candidate's tokenizer
    usd_per_million_input: float = 0.0
    usd_per_million_output: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    @property
    def refusal_rate(self) -> float:
        return _rate(self.redteam_answers)

    @property
    def overrefusal_rate(self) -> float:
        return _rate(self.overrefusal_answers)

    @property
    def cost_usd(self) -> float:
        return (self.prompt_tokens * self.usd_per_million_input
                + self.completion_tokens * self.usd_per_million_output) / 1e6

    @property
    def usd_per_million_output_all_in(self) -> float:
        """What 1M completion tokens cost with the prompt tokens they came with, at this run's input/output mix."""
        if not self.completion_tokens:
            return float("inf")
        return self.usd_per_million_output + self.usd_per_million_input * self.prompt_tokens / self.completion_tokens


def _rate(answers: list[str]) -> float:
    return sum(map(is_refusal, answers)) / len(answers) if answers else 0.0


class EndpointEngine:
    """Greedy chat answers from one endpoint, with bounded retries and errors that name it."""

    def __init__(self, spec, backoff_s: float = 1.0):
        import openai

        self.spec, self.backoff_s = spec, backoff_s
        self.where = f"endpoint {spec.name!r} ({spec.base_url}, model {spec.model!r})"
        key = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env, "").strip()
            if not key:
                raise EndpointError(f"{self.where}: the environment variable {spec.api_key_env} (api_key_env) is "
                                    "unset or empty")
        # our own retries (below) know which failures are worth one; the client's would hide them
        self.client = openai.OpenAI(base_url=spec.base_url, api_key=key or "unused", max_retries=0,
                                    timeout=spec.timeout_s)

    def chat(self, messages: list[dict], max_tokens: int) -> Answer:
        attempts = self.spec.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._stream(messages, max_tokens)
            except Exception as exc:
                what, transient, wait = classify(exc)
                if not transient:
                    raise EndpointError(f"{self.where}: {what}") from None
                if attempt == attempts:
                    raise EndpointError(f"{self.where}: {what} (gave up after {attempts} attempts)") from None
                time.sleep(min(30.0, wait if wait is not None else self.backoff_s * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def _stream(self, messages: list[dict], max_tokens: int) -> Answer:
        t0 = time.perf_counter()
        deadline = t0 + self.spec.timeout_s
        stream = self.client.chat.completions.create(
            model=self.spec.model, messages=messages, max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0,
            stream=True, stream_options={"include_usage": True})
        first, pieces, chunks, usage, saw_choice = None, [], 0, None, False
        try:
            for chunk in stream:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"the answer took longer than {self.spec.timeout_s:.0f}s (timeout_s)")
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
                for choice in chunk.choices or []:
                    saw_choice = True
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        first = first or time.perf_counter()
                        pieces.append(text)
                        chunks += 1
        finally:
            stream.close()
        if not saw_choice:
            raise MalformedReply("the reply held no chat completion chunk (not an OpenAI-compatible stream)")
        end = time.perf_counter()
        first = first or end
        n = usage.completion_tokens if usage is not None and usage.completion_tokens is not None else chunks
        tps = (n - 1) / (end - first) if n > 1 and end > first else 0.0
        return Answer("".join(pieces).strip(), (first - t0) * 1000.0, tps,
                      usage.prompt_tokens if usage is not None else None, n)


class MalformedReply(ValueError):
    pass


def classify(exc: Exception) -> tuple[str, bool, float | None]:
    """(what failed, worth a retry?, seconds the server asked us to wait)."""
    import httpx
    import openai

    if isinstance(exc, openai.APITimeoutError) or isinstance(exc, TimeoutError):
        return f"timed out ({exc})", True, None
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"cannot connect: {type(cause).__name__}: {cause}", True, None
    if isinstance(exc, openai.RateLimitError):
        after = exc.response.headers.get("retry-after") if exc.response is not None else None
        try:
            wait = float(after) if after else None
        except ValueError:
            wait = None
        return f"rate-limited (HTTP 429): {_body(exc)}", True, wait
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return f"HTTP {code}: {_body(exc)}", code >= 500 or code in (408, 409), None
    if isinstance(exc, (json.JSONDecodeError, MalformedReply, openai.APIResponseValidationError)):
        return f"malformed reply: {exc}", True, None
    if isinstance(exc, (httpx.HTTPError, ConnectionError)):  # the connection dropped in the middle of a stream
        return f"connection failed mid-answer: {type(exc).__name__}: {exc}", True, None
    return f"{type(exc).__name__}: {exc}", False, None


def _body(exc) -> str:
    try:
        text = exc.response.text
    except Exception:
        text = str(exc)
    return " ".join(text.split())[:300]


# ---- the gate's side ---------------------------------------------------------------------------------------------

def evaluate_endpoints(recipe: Recipe, inp, log=print) -> dict[str, EndpointEval]:
    """Every endpoint of the recipe on the golden, red-team and over-refusal sets (an endpoint that fails is
    kept with its error)."""
    out = {}
    for spec in recipe.eval_gate.endpoints:
        t = time.time()
        log(f"endpoint {spec.name}: {spec.base_url} ({spec.model})")
        ev = EndpointEval(spec.name, spec.model, spec.base_url, usd_per_million_input=spec.usd_per_million_input,
                          usd_per_million_output=spec.usd_per_million_output)
        try:
            _answer_all(recipe, inp, EndpointEngine(spec), ev)
        except EndpointError as exc:
            ev.error = str(exc)
            log(f"  error: {exc}")
        ev.seconds = time.time() - t
        log(f"endpoint {spec.name}: {ev.seconds:.1f}s")
        out[spec.name] = ev
    return out


def _answer_all(recipe: Recipe, inp, engine: EndpointEngine, ev: EndpointEval) -> None:
    from .evaluate import count_tokens

    cfg = recipe.eval_gate
    counter = count_tokens(inp.tokenizer)
    answers: dict[str, list[str]] = {}
    for set_name, items, max_tokens in (("golden", inp.golden, cfg.golden.max_new_tokens),
                                        ("redteam", inp.redteam, cfg.safety.max_new_tokens),
                                        ("overrefusal", inp.overrefusal, cfg.safety.max_new_tokens)):
        answers[set_name] = []
        for item in items:
            messages = item.messages()
            a = engine.chat(messages, max_tokens)
            answers[set_name].append(a.text)
            if set_name == "golden":
                ev.ttft_ms.append(a.ttft_ms)
                ev.tokens_per_s.append(a.tokens_per_s)
            if a.prompt_tokens is None:  # the endpoint gave no usage: count with the candidate's tokenizer
                ev.usage_reported = False
            ev.prompt_tokens += a.prompt_tokens if a.prompt_tokens is not None else sum(
                counter(m["content"]) for m in messages)
            ev.completion_tokens += a.completion_tokens
    ev.golden = score_golden(inp.golden, answers["golden"], counter)
    ev.redteam_answers, ev.overrefusal_answers = answers["redteam"], answers["overrefusal"]


def endpoint_checks(recipe: Recipe, evaluation) -> list[C.Check]:
    """Informational figures of each endpoint, and the gating comparisons the recipe asks for."""
    out: list[C.Check] = []
    specs = {s.name: s for s in recipe.eval_gate.endpoints}
    for name, ev in evaluation.endpoints.items():
        spec = specs[name]
        if ev.error:
            out.append(C.Check(name="endpoint_answered", artifact=name, value=0.0, threshold=1.0, passed=False,
                               gating=False, detail=ev.error))
        else:
            out += [C.info("endpoint_golden_pass_rate", name, ev.golden.pass_rate),
                    C.info("endpoint_golden_critical_failures", name, float(len(ev.golden.critical_failures)),
                           detail=", ".join(ev.golden.critical_failures)),
                    C.info("endpoint_refusal_rate", name, ev.refusal_rate),
                    C.info("endpoint_overrefusal_rate", name, ev.overrefusal_rate),
                    C.info("endpoint_latency_p95_ttft_ms", name, C.percentile(ev.ttft_ms, 95))]
        if spec.must_be_within is None:
            continue
        for art, aev in evaluation.artifacts.items():
            if aev.error:
                continue
            check_name = f"golden_within_{name}"
            if ev.error:
                out.append(C.Check(name=check_name, artifact=art, value=None, threshold=-spec.must_be_within,
                                   passed=False, gating=True, better="higher",
                                   detail=f"no comparison: {ev.error}"))
                continue
            gap = aev.golden.pass_rate - ev.golden.pass_rate
            out.append(C.at_least(check_name, art, gap, -spec.must_be_within,
                                  detail=f"pass rate {aev.golden.pass_rate:.2f} vs {name} ({ev.model}) "
                                         f"{ev.golden.pass_rate:.2f}: may be at most {spec.must_be_within:.2f} below"))
    return out


def verdict_entries(evaluation) -> dict[str, Any]:
    """verdict.json's `endpoints` and `load` entries (present only when the recipe asks for them)."""
    from dataclasses import asdict

    out: dict[str, Any] = {}
    if evaluation.endpoints:
        out["endpoints"] = [{"name": e.name, "model": e.model, "base_url": e.base_url, "error": e.error,
                             **({} if e.error else {
                                 "golden_pass_rate": e.golden.pass_rate, "golden_mean_score": e.golden.mean_score,
                                 "critical_failures": e.golden.critical_failures, "refusal_rate": e.refusal_rate,
                                 "overrefusal_rate": e.overrefusal_rate, "prompt_tokens": e.prompt_tokens,
                                 "completion_tokens": e.completion_tokens, "cost_usd": e.cost_usd})}
                            for e in evaluation.endpoints.values()]
    if evaluation.load is not None:
        ld = evaluation.load
        out["load"] = {"artifact": ld.artifact, "engine": ld.engine, "concurrency": ld.concurrency,
                       "error": ld.error, "level": asdict(ld.level) if ld.level is not None else None}
    return out


def break_even(machine_usd_per_hour: float, usd_per_million: float, tokens_per_s: float) -> dict[str, Any]:
    """The daily output-token volume above which a dedicated machine costs less than paying `usd_per_million`,
    against what the machine can serve at the measured speed. Above capacity, it never breaks even."""
    per_day = machine_usd_per_hour * 24.0
    volume = per_day / usd_per_million * 1e6 if usd_per_million > 0 else float("inf")
    capacity = max(tokens_per_s, 0.0) * 86400.0
    return {"break_even_tokens_per_day": volume, "capacity_tokens_per_day": capacity,
            "breaks_even": capacity >= volume,
            "self_hosted_usd_per_mtok": per_day / capacity * 1e6 if capacity > 0 else float("inf")}
