"""report.json, report.md and token_lengths.png: what the stage did, in numbers that reconcile.

Nothing here holds raw text: excerpts come from records already PII-scrubbed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .core import DROP_RULES, RULES, Cleaner
from .pii import PII_TYPES


def token_summary(hist: np.ndarray) -> dict:
    total = int(hist.sum())
    if total == 0:
        return {"records": 0}
    cum = np.cumsum(hist)

    def pct(q: float) -> int:
        return int(np.searchsorted(cum, q * total))

    lengths = np.arange(len(hist))
    return {"records": total, "min": int(np.flatnonzero(hist)[0]), "max": int(np.flatnonzero(hist)[-1]),
            "mean": round(float((hist * lengths).sum() / total), 1), "p50": pct(0.5), "p90": pct(0.9),
            "p99": pct(0.99)}


def pii_counts(cleaner: Cleaner) -> dict[str, int]:
    """Values replaced per PII type, for every type the stage looked for (a 0 says it looked and found none),
    built-in types first in their order, then the recipe's own patterns."""
    cfg, found = cleaner.cfg, cleaner.scrubber.counts
    if not cfg.pii:
        return {}
    types = [t for t in PII_TYPES if t in cfg.pii_types] + sorted(cfg.extra_pii_patterns)
    return {t: found.get(t, 0) for t in types}


def build_report(cleaner: Cleaner, *, raw: dict, golden: dict, fingerprints: dict, tokenizer: str) -> dict:
    st = cleaner.stats
    seconds = {r: round(st.seconds.get(r, 0.0), 3) for r in RULES}
    return {
        "input": raw,
        "golden": golden,
        "counts": st.counts(),
        "reconciliation": (f"{st.records_in} in = {st.quarantined} quarantined + "
                           + " + ".join(f"{st.dropped[r]} {r}" for r in DROP_RULES)
                           + f" + {st.kept} kept"),
        "quarantine_reasons": dict(sorted(st.quarantine_reasons.items())),
        "normalized_records": st.normalized,
        "ignored_fields": {cleaner.excerpt_scrubber.scrub(k): v for k, v in sorted(st.ignored_fields.items())},
        "pii": pii_counts(cleaner),
        "pii_types_off": [t for t in PII_TYPES if not cleaner.cfg.pii or t not in cleaner.cfg.pii_types],
        "near_dup_pairs_checked": st.near_dup_pairs_checked,
        "near_dup_lsh": {"bands": cleaner.hasher.bands, "rows": cleaner.hasher.rows,
                         "num_perm": cleaner.hasher.num_perm, "shingle_words": cleaner.hasher.shingle},
        "top_exact_dup_clusters": cleaner.cluster_report("exact"),
        "top_near_dup_clusters": cleaner.cluster_report("near"),
        "contaminated_examples": cleaner.contaminated_examples,
        # every cluster, so any dropped record can be traced to the one kept in its place
        "duplicate_clusters": {"exact": cleaner.all_clusters("exact"), "near": cleaner.all_clusters("near")},
        "token_lengths": {"tokenizer": tokenizer, **token_summary(cleaner.token_hist)},
        "fingerprints": fingerprints,
        "seconds_per_rule": seconds,
        "rules": cleaner.cfg.model_dump(mode="json", exclude={"pii_salt_env"}),
    }


def write_histogram(hist: np.ndarray, path: Path, max_tokens: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    nz = np.flatnonzero(hist)
    if len(nz):
        top = int(nz[-1]) + 1
        lengths = np.arange(top)
        ax.hist(lengths, bins=min(60, max(1, top)), weights=hist[:top], color="#4477aa")
    if max_tokens:
        ax.axvline(max_tokens, color="#cc3311", linestyle="--", label=f"max_tokens = {max_tokens}")
        ax.legend()
    ax.set_xlabel("tokens per kept record (base tokenizer)")
    ax.set_ylabel("records")
    ax.set_title("Token lengths of kept records")
    fig.tight_layout()
    # fixed metadata: the same data gives the same bytes
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write_markdown(report: dict, path: Path) -> None:
    c = report["counts"]
    lines = [
        "# Data cleaning report",
        "",
        f"Input: `{report['input']['path']}` (sha256 `{report['input']['sha256'][:16]}...`)",
        "",
        "## Reconciliation",
        "",
        f"**{report['reconciliation']}** - {'reconciles' if c['reconciles'] else 'DOES NOT RECONCILE'}",
        "",
        "| outcome | records |",
        "|---|---:|",
        f"| records in | {c['records_in']} |",
        f"| quarantined | {c['quarantined']} |",
    ]
    lines += [f"| dropped: {rule} | {n} |" for rule, n in c["dropped"].items()]
    lines += [f"| kept: {split} | {n} |" for split, n in c["splits"].items()]
    lines += ["", f"Blank lines skipped (not records): {c['blank_lines']}. Records changed by normalization: "
              f"{report['normalized_records']}.", ""]
    if c.get("upsampled"):
        lines += ["Upsampled (cleaning.upsample): " + ", ".join(
            f"{n} extra train rows of `{source}`" for source, n in c["upsampled"].items())
            + f"; the train split has {c['splits']['train'] + sum(c['upsampled'].values())} rows.", ""]
    lines += ["## Quarantine reasons", "", "| reason | records |", "|---|---:|"]
    lines += [f"| {r} | {n} |" for r, n in report["quarantine_reasons"].items()] or ["| (none) | 0 |"]
    lines += ["", "Each quarantined line is in `quarantine.jsonl` with its line number and reason.", ""]
    lines += ["## PII replaced (by type)", "", "| type | values replaced |", "|---|---:|"]
    lines += [f"| {t} | {n} |" for t, n in report["pii"].items()] or ["| (PII scrubbing is off) | - |"]
    lines += [f"| {t} | off (`cleaning.pii_types`) |" for t in report["pii_types_off"] if report["pii"]]
    lines += ["", "Values are replaced by `<TYPE_xxxx>` placeholders carrying a salted hash; equal values get "
              "equal placeholders.", ""]
    for title, key in (("Top exact-duplicate clusters", "top_exact_dup_clusters"),
                       ("Top near-duplicate clusters", "top_near_dup_clusters")):
        lines += [f"## {title}", "", "| kept line | size | dropped lines | kept record |", "|---:|---:|---|---|"]
        for cl in report[key]:
            members = ", ".join(map(str, cl["member_lines"][:8])) + (" ..." if cl["size"] - 1 > 8 else "")
            lines.append(f"| {cl['representative_line']} | {cl['size']} | {members} | {_md(cl['excerpt'])} |")
        if not report[key]:
            lines.append("| - | - | - | (none) |")
        lines.append("")
    t = report["token_lengths"]
    lines += ["## Token lengths", "", f"Tokenizer: `{t['tokenizer']}`. " + (
        f"min {t['min']}, p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}, mean {t['mean']}."
        if t.get("records") else "No kept records."), "", "![token lengths](token_lengths.png)", ""]
    lines += ["## Dataset fingerprints (sha256 of the rows)", ""]
    lines += [f"- `{s}`: `{fp}`" for s, fp in report["fingerprints"].items()]
    lines += ["", "## Seconds per rule", "", "| rule | seconds |", "|---|---:|"]
    lines += [f"| {r} | {s} |" for r, s in report["seconds_per_rule"].items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
