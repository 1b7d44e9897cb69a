"""The version's description in the MLflow UI: what a reviewer reads in ten seconds before opening the report.

Verdict first, then the failed checks, then base -> each artifact for the metrics that decide whether the
fine-tune is worth serving, rounded to the digits that carry meaning, then where the full report is.
"""
from __future__ import annotations

import math
from typing import Any

# (metric name in verdict.json, row label, how to show a value)
KEY_METRICS = (
    ("golden_pass_rate", "golden pass rate", "rate"), ("golden_gain_over_base", "gain over base", "gain"),
    ("golden_critical_failures", "critical golden failures", "count"), ("refusal_rate", "red-team refused", "pct"),
    ("overrefusal_rate", "harmless prompts refused", "pct"), ("pii_canary_leaks", "PII canary leaks", "count"),
    ("kld", "KLD vs full precision", "sig2"), ("top1_agreement", "top-1 agreement", "rate"),
    ("latency_p95_ttft_ms", "p95 time to first token (ms)", "int"), ("tokens_per_s_p5", "p5 tokens/s", "int"),
)
BASE_KEYS = {"golden_pass_rate": "golden_pass_rate", "refusal_rate": "refusal_rate",
             "overrefusal_rate": "overrefusal_rate"}


def shown(value: Any, how: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if how == "pct":
        return f"{value:.0%}"
    if how == "rate":
        return f"{value:.2f}"
    if how == "gain":
        return f"{value:+.2f}"
    if how == "sig2":
        return f"{value:.2g}"
    return f"{value:.0f}"


def version_description(verdict: dict, gate_run_id: str | None) -> str:
    checks = verdict.get("checks", [])
    failed = [c for c in checks if c.get("gating") and not c.get("passed")]
    lines = [f"## Eval gate: {'PASSED' if verdict.get('passed') else f'FAILED ({len(failed)} checks)'}", ""]
    for c in failed:
        lines.append(f"- **{c.get('metric')}**: {_value(c.get('value'))} vs threshold {_value(c.get('threshold'))}"
                     + (f" — {str(c.get('detail'))[:160]}" if c.get("detail") else ""))
    if failed:
        lines.append("")
    names = {name for name, _, _ in KEY_METRICS}
    artifacts = list(dict.fromkeys(c.get("artifact") or "candidate" for c in checks if c.get("name") in names))
    base = verdict.get("base") or {}
    lines += ["| | base | " + " | ".join(artifacts) + " |", "|---|---|" + "---|" * len(artifacts)]
    by_key = {(c.get("name"), c.get("artifact") or "candidate"): c for c in checks}
    for name, label, how in KEY_METRICS:
        cells = [shown(by_key[(name, a)].get("value"), how) if (name, a) in by_key else "" for a in artifacts]
        if any(cells):
            lines.append(f"| {label} | {shown(base.get(BASE_KEYS[name]), how) if name in BASE_KEYS else ''} | "
                         + " | ".join(cells) + " |")
    gain = next((c for c in checks if c.get("name") == "golden_gain_over_base"), None)
    if gain:
        lines += ["", f"Gain over base ({gain['artifact']}): {gain.get('detail', '')}"]
    where = f" and in the eval_gate run `{gate_run_id}`" if gate_run_id else ""
    lines += ["", f"Full report: `gate/report.html` (and `gate/report.md`) in this version's files{where}. "
                  "Every file's sha256: `sha256.json`."]
    return "\n".join(lines)


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
