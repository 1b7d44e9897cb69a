"""The report's served-model sections: the endpoints beside the candidate, latency under load, and the cost of
self-hosting against each endpoint's prices, checked against what the measured speed can serve."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import checks as C
from .verdict import GateResult


def breaks_even_text(row: dict[str, Any]) -> str:
    """Whether a dedicated machine pays off at any volume it can serve, for a cost row with break-even and capacity."""
    volume, capacity = row["break_even_tokens_per_day"], row["capacity_tokens_per_day"]
    if not math.isfinite(volume):
        return "never (the alternative costs nothing)"
    if capacity < volume:
        return f"**never**: it serves at most {capacity:,.0f} tokens/day at the measured speed, below {volume:,.0f}"
    return f"above {volume:,.0f} tokens/day ({volume / capacity:.0%} of its capacity)"


def served_sections(result: GateResult, out_dir: Path) -> list[list[str]]:
    return [_endpoint_section(result), _load_section(result, out_dir), _endpoint_cost_section(result)]


def _endpoint_section(result: GateResult) -> list[str]:
    from .report import _cell, _table

    ev = result.evaluation
    if not ev.endpoints:
        return []
    specs = {s.name: s for s in result.recipe.eval_gate.endpoints}
    latency = {r.artifact: r for r in result.latency}
    rows = [["base (reference)", "", ev.base.golden.pass_rate, ev.base.golden.mean_score,
             len(ev.base.golden.critical_failures), ev.base.refusal_rate, ev.base.overrefusal_rate, None, None, ""]]
    for a, aev in ev.artifacts.items():
        if aev.error:
            continue
        lat = latency.get(a)
        rows.append([a, "candidate", aev.golden.pass_rate, aev.golden.mean_score, len(aev.golden.critical_failures),
                     aev.refusal_rate, aev.overrefusal_rate, lat.ttft_p95 if lat else None, lat.tps_p50 if lat else None,
                     "self-hosted"])
    errors = []
    for name, e in ev.endpoints.items():
        gate = (f"gated: within {specs[name].must_be_within:.2f}" if specs[name].must_be_within is not None
                else "compared")
        if e.error:
            rows.append([name, f"{e.model} ({gate})", "**error**", "", "", "", "", None, None, ""])
            errors.append(f"- **{name}** was not scored: {_cell(e.error)}")
            continue
        rows.append([name, f"{e.model} ({gate})", e.golden.pass_rate, e.golden.mean_score,
                     len(e.golden.critical_failures), e.refusal_rate, e.overrefusal_rate, C.percentile(e.ttft_ms, 95),
                     C.percentile(e.tokens_per_s, 50),
                     f"${e.usd_per_million_input:g} in / ${e.usd_per_million_output:g} out per 1M"])
    lines = ["## Endpoints beside the candidate", "",
             "The same golden, red-team and over-refusal prompts, greedy, through each endpoint's chat completions API, "
             "one request at a time (latency is the unloaded figure; the candidate's is llama.cpp on this machine).", "",
             _table(["model", "what", "golden pass rate", "mean score", "critical failures", "red-team refused",
                     "harmless refused", "TTFT p95 ms", "tokens/s p50", "price"], rows), ""]
    lines += errors + ([""] if errors else [])
    lines += _differences(result)
    return lines


def _differences(result: GateResult) -> list[str]:
    """Which golden cases the first artifact and each endpoint disagree on."""
    ev = result.evaluation
    arts = [a for a, e in ev.artifacts.items() if not e.error]
    if not arts:
        return []
    cand = ev.artifacts[arts[0]].golden.cases
    out = []
    for name, e in ev.endpoints.items():
        if e.error:
            continue
        only_ep = [c.id for c, x in zip(cand, e.golden.cases) if x.status == "pass" and c.status != "pass"]
        only_cand = [c.id for c, x in zip(cand, e.golden.cases) if c.status == "pass" and x.status != "pass"]
        out.append(f"- {name} passes and {arts[0]} fails: {', '.join(only_ep) or 'none'}; "
                   f"{arts[0]} passes and {name} fails: {', '.join(only_cand) or 'none'}")
    return out + ([""] if out else [])


def _load_section(result: GateResult, out_dir: Path) -> list[str]:
    from workbench.loadtest import HEADER, level_row

    from .report import _table

    ld = result.evaluation.load
    if ld is None:
        return []
    cfg = result.recipe.eval_gate.load
    head = [f"## Latency under load ({ld.artifact} behind {ld.engine}, {ld.concurrency} clients, this machine)", ""]
    if ld.error or ld.level is None:
        return head + [f"**The load test did not run**: {ld.error}", ""]
    limit = f"limit on p95 TTFT: {cfg.max_p95_ttft_ms:g} ms" if cfg.max_p95_ttft_ms else "reported, not gated"
    return head + [f"The golden prompts, streamed, {cfg.requests} requests at most within {cfg.max_seconds:g}s ({limit}).",
                   "", _table(HEADER, [level_row(ld.level)]), ""]


def _throughputs(result: GateResult) -> list[tuple[str, float, str]]:
    """(artifact, output tokens/s, how measured): under load where the gate load-tested, else one stream."""
    out = [(r["artifact"], r["tokens_per_s"], "one stream, p50") for r in result.cost]
    ld = result.evaluation.load
    if ld is not None and ld.level is not None and not ld.error:
        out.append((ld.artifact, ld.level.tokens_per_s, f"{ld.concurrency} clients, aggregate"))
    return out


def _endpoint_cost_section(result: GateResult) -> list[str]:
    from .endpoints import break_even
    from .report import _table

    eps = [e for e in result.evaluation.endpoints.values() if not e.error]
    if not eps:
        return []
    hour = result.recipe.eval_gate.cost.gpu_hour_usd
    rows = []
    for e in eps:
        price = e.usd_per_million_output_all_in
        for art, tps, how in _throughputs(result):
            be = break_even(hour, price, tps)
            rows.append([e.name, price, art, f"{tps:.1f} ({how})", be["self_hosted_usd_per_mtok"],
                         be["break_even_tokens_per_day"], be["capacity_tokens_per_day"], breaks_even_text(be)])
    mix = "; ".join(f"{e.name}: {e.prompt_tokens:,} prompt + {e.completion_tokens:,} completion tokens, "
                    f"${e.cost_usd:.4f}" + ("" if e.usage_reported else " (token counts from the candidate's tokenizer)")
                    for e in eps)
    return ["## Cost: self-hosting against each endpoint", "",
            f"An endpoint's price per 1M completion tokens includes the prompt tokens that came with them, at this run's "
            f"mix ({mix}). The machine costs ${hour:g}/hour, 24 h a day; its capacity is the measured output speed "
            "times a day. Where the break-even volume is above the capacity, self-hosting never pays off on this "
            "machine.", "",
            _table(["endpoint", "$/1M completion tokens (all in)", "artifact", "tokens/s", "self-hosted $/1M at capacity",
                    "break-even tokens/day", "capacity tokens/day", "breaks even?"], rows), ""]
