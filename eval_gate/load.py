"""Latency under load: the candidate's GGUF behind the same server `wb serve` runs, load-tested in the gate.

One GGUF artifact (the recipe's `eval_gate.load.artifact`, else the smallest) is served on 127.0.0.1 by
`workbench.serving` and sent the golden prompts by `load.concurrency` streaming clients (`workbench.loadtest`).
The gate reports time to first token and throughput under that load; p95 TTFT becomes a check when the recipe sets
`load.max_p95_ttft_ms`. The aggregate throughput is what the cost table's capacity is computed from: one stream at
a time understates a server that batches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from recipes import Recipe
from workbench.workspace import StageError

from . import checks as C


@dataclass
class LoadEval:
    artifact: str
    engine: str
    concurrency: int
    level: object | None = None  # workbench.loadtest.LevelResult
    seconds: float = 0.0
    error: str | None = None


def pick_artifact(recipe: Recipe, artifacts: list):
    ggufs = [a for a in artifacts if a.format == "gguf"]
    wanted = recipe.eval_gate.load.artifact
    if wanted is not None:
        hit = [a for a in ggufs if a.name == wanted]
        if not hit:
            raise StageError(f"eval_gate.load.artifact: {wanted!r} is not a GGUF artifact of this candidate "
                             f"(it has: {', '.join(a.name for a in ggufs) or 'none'})")
        return hit[0]
    if not ggufs:
        raise StageError("eval_gate.load.enabled: the candidate has no GGUF artifact to serve")
    return min(ggufs, key=lambda a: a.path.stat().st_size)


def run_load_check(recipe: Recipe, inp, scratch: Path, log=print) -> LoadEval | None:
    from workbench.loadtest import loadtest
    from workbench.serving import Server, ServeSpec, default_threads, free_port

    cfg = recipe.eval_gate.load
    if not cfg.enabled:
        return None
    art = pick_artifact(recipe, inp.artifacts)
    ev = LoadEval(art.name, cfg.engine, cfg.concurrency)
    t = time.time()
    spec = ServeSpec(model=art.path, name=recipe.registry.model_name, port=free_port(),
                     threads=recipe.eval_gate.latency.threads or default_threads(), n_ctx=recipe.eval_gate.latency.n_ctx,
                     parallel=cfg.concurrency, lineage={"artifact": art.name, "recipe": recipe.name})
    log(f"load: {art.name} behind {cfg.engine}, {cfg.concurrency} clients, {cfg.requests} requests")
    try:
        with Server(spec, cfg.engine, scratch / "load-server.log"):
            result = loadtest(spec.base_url, spec.name, [c.messages() for c in inp.golden], levels=[cfg.concurrency],
                              requests=cfg.requests, max_seconds=cfg.max_seconds,
                              max_tokens=recipe.eval_gate.golden.max_new_tokens)
        ev.level = result.levels[0]
    except StageError as exc:
        ev.error = str(exc)
        log(f"  error: {exc}")
    ev.seconds = time.time() - t
    return ev


def load_checks(recipe: Recipe, ev: LoadEval | None) -> list[C.Check]:
    """p95 TTFT under load (gating when a limit is set), the errors it met, and the aggregate throughput. Named
    latency_* / tokens_per_s*: machine-dependent, so the champion comparison skips them by default."""
    if ev is None:
        return []
    limit = recipe.eval_gate.load.max_p95_ttft_ms
    a = ev.artifact
    if ev.error or ev.level is None:
        return [C.Check(name="latency_load_p95_ttft_ms", artifact=a, value=None, threshold=limit, passed=False,
                        gating=limit is not None, better="lower", detail=f"load test did not run: {ev.error}")]
    lv = ev.level
    where = f"{ev.engine}, {lv.clients} clients, {lv.requests} requests"
    p95 = C.at_most("latency_load_p95_ttft_ms", a, lv.ttft_p95_ms, limit, detail=where) if limit else \
        C.info("latency_load_p95_ttft_ms", a, lv.ttft_p95_ms, better="lower", detail=where)
    errors = C.at_most("latency_load_errors", a, float(lv.errors), 0.0, gating=limit is not None,
                       detail="; ".join(lv.error_samples[:3]))
    return [p95, errors, C.info("tokens_per_s_load", a, lv.tokens_per_s, better="higher",
                                detail=f"output tokens/s of all {lv.clients} clients together")]
