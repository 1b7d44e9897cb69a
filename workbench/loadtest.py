"""Load-test an OpenAI-compatible server on this machine: streaming chat completions at bounded concurrency levels.

For each level (e.g. 1, 4, 16 clients) a bounded number of requests, within a bounded time, each one a golden
prompt sent with the real `openai` client (streaming, greedy). Per level: time to first token p50/p95/p99,
end-to-end latency p50/p95, output tokens/s in aggregate and per request, and errors, each one counted with
its reason; a request that outlives its timeout is an error, so a dead server gives errors, never a hang.

Loopback only: load-testing someone else's API is not what this is for.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .serving import is_loopback
from .workspace import StageError


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


@dataclass
class LevelResult:
    clients: int
    requests: int            # sent
    errors: int
    wall_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    ttft_p99_ms: float
    e2e_p50_s: float
    e2e_p95_s: float
    tokens_per_s: float      # output tokens of every successful request / the level's wall time
    tokens_per_s_per_request_p50: float
    output_tokens: int
    error_samples: list[str] = field(default_factory=list)


@dataclass
class LoadTestResult:
    base_url: str
    model: str
    max_tokens: int
    levels: list[LevelResult]
    label: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def level(self, clients: int) -> LevelResult:
        return next(lv for lv in self.levels if lv.clients == clients)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname or ""
    if not is_loopback(host):
        raise StageError(f"{base_url}: the load test only loads servers on this machine (127.0.0.1 / localhost); "
                         f"{host!r} is not one")


async def _one(client, model: str, messages: list[dict], max_tokens: int, timeout: float) -> RequestResult:
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None

    async def consume():
        nonlocal first, chunks, usage
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()

    try:
        await asyncio.wait_for(consume(), timeout)
    except Exception as exc:  # every failure is counted with its reason, whatever raised it
        reason = "timed out" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else str(exc)[:200]
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {reason}")
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None and usage.completion_tokens else chunks
    return RequestResult(ok=True, ttft_s=((first or end) - t0), e2e_s=end - t0, tokens=tokens,
                         prompt_tokens=usage.prompt_tokens if usage is not None else None)


async def _level(base_url: str, model: str, conversations: list[list[dict]], clients: int, requests: int,
                 max_seconds: float, max_tokens: int, key: str | None, timeout: float) -> LevelResult:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout))
    # no retries: a load test counts what failed instead of hiding it
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key or "unused", max_retries=0, http_client=http)
    results: list[RequestResult] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + max_seconds  # no new request after it; those in flight end within their timeout

    async def worker():
        nonlocal next_index
        while next_index < requests and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            results.append(await _one(client, model, conversations[i % len(conversations)], max_tokens, timeout))

    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await client.close()
    return summarize(clients, results, time.perf_counter() - start)


def summarize(clients: int, results: list[RequestResult], wall_s: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1000.0 for r in ok]
    e2e = [r.e2e_s for r in ok]
    per_request = [(r.tokens - 1) / (r.e2e_s - r.ttft_s) for r in ok if r.tokens > 1 and r.e2e_s > r.ttft_s]
    errors = [r.error for r in results if not r.ok]
    samples = sorted(set(errors), key=errors.index)[:5]
    tokens = sum(r.tokens for r in ok)
    return LevelResult(
        clients=clients, requests=len(results), errors=len(errors), wall_s=wall_s,
        ttft_p50_ms=percentile(ttft, 50), ttft_p95_ms=percentile(ttft, 95), ttft_p99_ms=percentile(ttft, 99),
        e2e_p50_s=percentile(e2e, 50), e2e_p95_s=percentile(e2e, 95),
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        tokens_per_s_per_request_p50=percentile(per_request, 50), output_tokens=tokens, error_samples=samples)


def default_requests(clients: int) -> int:
    """Enough requests for a p95 at every level: 16, and four per client beyond that."""
    return max(16, 4 * clients)


def loadtest(base_url: str, model: str, conversations: list[list[dict]], levels: list[int] = (1, 4, 16),
             requests: int | None = None, max_seconds: float = 120.0, max_tokens: int = 48,
             key: str | None = None, timeout: float = 60.0, label: str = "",
             progress=None) -> LoadTestResult:
    """Run every level in order against base_url (…/v1); `progress(LevelResult)` after each."""
    check_loopback(base_url)
    if not conversations:
        raise StageError("the load test needs at least one prompt")
    if any(c < 1 for c in levels):
        raise StageError(f"concurrency levels must be >= 1 (got {list(levels)})")
    out = []
    for clients in levels:
        n = requests or default_requests(clients)
        lv = asyncio.run(_level(base_url, model, conversations, clients, n, max_seconds, max_tokens, key, timeout))
        out.append(lv)
        if progress is not None:
            progress(lv)
    return LoadTestResult(base_url=base_url, model=model, max_tokens=max_tokens, levels=out, label=label)


# ---- reporting ---------------------------------------------------------------------------------------------------

HEADER = ["clients", "requests", "errors", "TTFT p50 ms", "TTFT p95 ms", "TTFT p99 ms", "e2e p50 s", "e2e p95 s",
          "tokens/s (all)", "tokens/s per request p50"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "–" if v != v else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}")
    return str(v)


def level_row(lv: LevelResult) -> list:
    return [lv.clients, lv.requests, lv.errors, lv.ttft_p50_ms, lv.ttft_p95_ms, lv.ttft_p99_ms, lv.e2e_p50_s,
            lv.e2e_p95_s, lv.tokens_per_s, lv.tokens_per_s_per_request_p50]


def markdown_table(results: list[LoadTestResult]) -> str:
    labelled = len(results) > 1 or any(r.label for r in results)
    header = (["server"] if labelled else []) + HEADER
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        for lv in r.levels:
            lines.append("| " + " | ".join(([r.label] if labelled else []) + [_fmt(v) for v in level_row(lv)]) + " |")
    return "\n".join(lines)


def plot(results: list[LoadTestResult], path: Path) -> Path:
    """Latency (TTFT and end-to-end, p50 and p95) and aggregate tokens/s against the number of clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.4))
    levels = sorted({lv.clients for r in results for lv in r.levels})
    for i, r in enumerate(results):
        xs, color, tag = [lv.clients for lv in r.levels], f"C{i}", f"{r.label} " if r.label else ""
        # one colour per server: dashed p50, solid p95
        a1.plot(xs, [lv.ttft_p50_ms for lv in r.levels], "o--", color=color, label=f"{tag}p50")
        a1.plot(xs, [lv.ttft_p95_ms for lv in r.levels], "o-", color=color, label=f"{tag}p95")
        a2.plot(xs, [lv.e2e_p50_s for lv in r.levels], "o--", color=color, label=f"{tag}p50")
        a2.plot(xs, [lv.e2e_p95_s for lv in r.levels], "o-", color=color, label=f"{tag}p95")
        a3.plot(xs, [lv.tokens_per_s for lv in r.levels], "o-", color=color, label=r.label or "aggregate")
    for ax, title in ((a1, "time to first token (ms)"), (a2, "end-to-end latency (s)"), (a3, "output tokens/s, all clients")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(x) for x in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: list[LoadTestResult], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "loadtest.json", "md": out_dir / "loadtest.md", "png": out_dir / "loadtest.png"}
    paths["json"].write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")
    paths["md"].write_text(markdown_table(results) + "\n")
    plot(results, paths["png"])
    return paths
