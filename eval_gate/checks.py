"""The verdict's checks and the arithmetic behind them (drift, percentiles, champion comparison, cost).

A check is one row of verdict.json: a value against a threshold, for one artifact (or the candidate as a
whole), gating or informational. Its metric name (`name` or `name.artifact`) is what the gate logs to
MLflow and what publish turns into `metric.<name>` tags on the registered version.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Direction = Literal["higher", "lower"]


@dataclass(kw_only=True)
class Check:
    name: str
    artifact: str | None
    value: float | None
    threshold: float | None
    passed: bool
    gating: bool
    better: Direction | None = None  # which way is better, for the champion comparison
    detail: str = ""

    @property
    def metric(self) -> str:
        return self.name if self.artifact is None else f"{self.name}.{self.artifact}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["metric"] = self.metric
        return d


def at_least(name: str, artifact: str | None, value: float, threshold: float, *, gating: bool = True,
             detail: str = "") -> Check:
    return Check(name=name, artifact=artifact, value=value, threshold=threshold, passed=value >= threshold,
                 gating=gating, better="higher", detail=detail)


def at_most(name: str, artifact: str | None, value: float, threshold: float, *, gating: bool = True,
            detail: str = "") -> Check:
    return Check(name=name, artifact=artifact, value=value, threshold=threshold, passed=value <= threshold,
                 gating=gating, better="lower", detail=detail)


def info(name: str, artifact: str | None, value: float | None, *, detail: str = "",
         better: Direction | None = None) -> Check:
    return Check(name=name, artifact=artifact, value=value, threshold=None, passed=True, gating=False, better=better,
                 detail=detail)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), numpy's default method."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Drift:
    kld: float
    top1: float
    ppl_ratio: float
    tokens: int


def drift(parent_lp, child_lp, records: list[list[int]]) -> Drift:
    """llama.cpp --kl-divergence metrics from two [N, vocab] log-prob arrays over the same token records:
    mean KL(parent || child), top-1 agreement, and perplexity ratio child / parent."""
    import numpy as np

    n = min(len(parent_lp), len(child_lp))
    if n == 0:
        raise ValueError("no positions to compare")
    kl_sum, agree = 0.0, 0
    for s in range(0, n, 256):
        p = parent_lp[s : s + 256].astype(np.float32)
        q = child_lp[s : s + 256].astype(np.float32)
        kl_sum += float((np.exp(p) * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
    # next-token NLL at the positions both arrays cover
    nll_p = nll_q = 0.0
    count, offset = 0, 0
    for ids in records:
        for t in range(len(ids) - 1):
            if offset + t >= n:
                break
            nll_p -= float(parent_lp[offset + t, ids[t + 1]])
            nll_q -= float(child_lp[offset + t, ids[t + 1]])
            count += 1
        offset += len(ids)
        if offset >= n:
            break
    ratio = math.exp((nll_q - nll_p) / max(count, 1))
    return Drift(kld=kl_sum / n, top1=agree / n, ppl_ratio=ratio, tokens=n)


@dataclass
class PairedGain:
    """Candidate vs base on the same cases: the gain in pass rate, its 95% interval, and an exact McNemar p-value."""

    gain: float
    low: float
    high: float
    better: int  # cases the candidate passes and the base does not
    worse: int  # cases the base passes and the candidate does not
    n: int
    p_value: float  # one-sided: how likely this many `better` of the discordant cases would be if neither side were

    def describe(self) -> str:
        return (f"{self.gain:+.2f} (95% CI {self.low:+.2f}..{self.high:+.2f}), {self.better} better and {self.worse} "
                f"worse of {self.n} cases, McNemar p={self.p_value:.2g}")


def paired_gain(candidate: list[bool], base: list[bool]) -> PairedGain:
    """Only the discordant cases carry information about which side is better (McNemar): b better, c worse.
    The interval is the Wald interval of a paired difference of proportions."""
    if len(candidate) != len(base) or not base:
        raise ValueError(f"paired comparison needs the same non-empty cases ({len(candidate)} vs {len(base)})")
    n = len(base)
    b = sum(c and not s for c, s in zip(candidate, base))
    c = sum(s and not c for c, s in zip(candidate, base))
    gain = (b - c) / n
    half = 1.96 * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    m = b + c
    p = sum(math.comb(m, i) for i in range(b, m + 1)) / 2 ** m if m else 1.0
    return PairedGain(gain, gain - half, gain + half, b, c, n, p)


def compare_to_champion(checks: list[Check], champion_metrics: dict[str, float], absolute: float, relative: float,
                        per_metric: dict[str, Any], ignore: list[str]) -> list[dict[str, Any]]:
    """One row per metric both sides have: champion value, candidate value, allowed slack, regressed?

    Like MLflow's MetricThreshold: a metric regresses when the candidate is worse than the champion by more
    than the absolute tolerance *and* by more than the relative one (slack = max of the two).
    """
    rows = []
    for c in checks:
        if c.value is None or c.better is None or c.metric not in champion_metrics:
            continue
        if any(fnmatch.fnmatch(c.metric, pat) for pat in ignore):
            continue
        champ = champion_metrics[c.metric]
        tol = per_metric.get(c.metric)
        a = tol.absolute if tol is not None else absolute
        r = tol.relative if tol is not None else relative
        worse_by = (champ - c.value) if c.better == "higher" else (c.value - champ)
        slack = max(a, r * abs(champ))
        rows.append({"metric": c.metric, "champion": champ, "candidate": c.value, "better": c.better,
                     "worse_by": worse_by, "allowed": slack, "regressed": worse_by > slack + 1e-12})
    return rows


def cost(tokens_per_s: float, gpu_hour_usd: float, api_usd_per_mtok: float) -> dict[str, float]:
    """Self-hosted $/1M tokens at the measured speed, and the daily volume above which self-hosting a
    dedicated machine (paid 24h a day) is cheaper than the API."""
    if tokens_per_s <= 0:
        return {"self_hosted_usd_per_mtok": float("inf"), "break_even_tokens_per_day": float("inf"),
                "capacity_tokens_per_day": 0.0, "breaks_even": False}
    self_hosted = gpu_hour_usd / (tokens_per_s * 3600.0) * 1e6
    break_even = gpu_hour_usd * 24.0 / api_usd_per_mtok * 1e6
    capacity = tokens_per_s * 86400.0
    # a machine that cannot serve the break-even volume at its measured speed never breaks even, at any volume
    return {"self_hosted_usd_per_mtok": self_hosted, "break_even_tokens_per_day": break_even,
            "capacity_tokens_per_day": capacity, "breaks_even": capacity >= break_even}
