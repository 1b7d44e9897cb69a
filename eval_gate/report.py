"""report.md and its plots: what a person reads to decide whether to trust the verdict."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import checks as C


def _f(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(_f(c) if not isinstance(c, str) else c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plots(out_dir: Path, checks: list[C.Check], tables: dict[str, Any], evals: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # 1. golden pass rate and mean score per artifact
    arts = [a for a, e in evals.items() if not e.error]
    if arts:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(arts)), 3.2))
        xs = range(len(arts))
        ax.bar([x - 0.2 for x in xs], [evals[a].golden.pass_rate for a in arts], 0.4, label="pass rate")
        ax.bar([x + 0.2 for x in xs], [evals[a].golden.mean_score for a in arts], 0.4, label="mean score")
        thr = next((c.threshold for c in checks if c.name == "golden_pass_rate"), None)
        if thr is not None:
            ax.axhline(thr, color="k", ls="--", lw=1, label="min pass rate")
        ax.set_xticks(list(xs), arts, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title("Golden set per artifact")
        ax.legend(fontsize=8)
        made.append(_save(fig, out_dir / "golden.png"))
    # 2. gating checks: value relative to threshold (pass/fail colours)
    gating = [c for c in checks if c.gating and c.value is not None]
    if gating:
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(gating) + 1))
        labels = [c.metric for c in gating]
        ax.barh(range(len(gating)), [1] * len(gating), color=["tab:green" if c.passed else "tab:red" for c in gating])
        for y, c in enumerate(gating):
            ax.text(0.02, y, f"{'pass' if c.passed else 'FAIL'}: {_f(c.value)} vs {_f(c.threshold)}", va="center",
                    fontsize=7, color="white")
        ax.set_yticks(range(len(gating)), labels, fontsize=7)
        ax.set_xticks([])
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title("Gating checks")
        made.append(_save(fig, out_dir / "checks.png"))
    # 3. KLD per quant type, with each type's limit
    if tables["drift"]:
        rows = tables["drift"]
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows)), 3.2))
        ax.bar(range(len(rows)), [max(r["kld"], 1e-6) for r in rows], color="tab:blue", label="mean KLD")
        ax.scatter(range(len(rows)), [r["limit"].max_kld for r in rows], color="k", marker="_", s=400, label="limit")
        ax.set_xticks(range(len(rows)), [r["artifact"] for r in rows], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("nats / token")
        ax.set_title("KL divergence vs full-precision parent")
        ax.legend(fontsize=8)
        made.append(_save(fig, out_dir / "kld.png"))
    # 4. latency distribution per GGUF
    if tables["latency"]:
        rows = tables["latency"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        a1.boxplot([r["ttft_ms"] for r in rows], whis=(5, 95))
        a1.set_xticks(range(1, len(rows) + 1), [r["artifact"] for r in rows], rotation=20)
        a1.set_title("time to first token (ms)")
        a2.boxplot([r["tokens_per_s"] for r in rows], whis=(5, 95))
        a2.set_xticks(range(1, len(rows) + 1), [r["artifact"] for r in rows], rotation=20)
        a2.set_title("decode tokens/s")
        made.append(_save(fig, out_dir / "latency.png"))
    return made


def write_report(out_dir: Path, recipe, inp, verdict: dict[str, Any], checks: list[C.Check], tables: dict[str, Any],
                 evals: dict, ctx: dict[str, Any], seconds: float) -> None:
    plots = _plots(out_dir, checks, tables, evals)
    failed = [c for c in checks if c.gating and not c.passed]
    L: list[str] = []
    L.append(f"# Eval gate: {recipe.name} — {'PASSED' if verdict['passed'] else 'FAILED'}")
    L.append("")
    L.append(f"Candidate: quantize manifest sha256 `{verdict['candidate_manifest_sha256'][:16]}…`; "
             f"base `{recipe.base_model.label}`; {len(inp.artifacts)} served artifacts "
             f"({', '.join(a.name for a in inp.artifacts)}); gate took {seconds:.0f}s.")
    L.append("")
    if failed:
        L.append("## Failed checks")
        L.append("")
        for c in failed:
            L.append(f"- **{c.metric}**: {_f(c.value)} (threshold {_f(c.threshold)})" + (f" — {c.detail}" if c.detail else ""))
        L.append("")
    L.append("## All checks")
    L.append("")
    L.append("Gating checks decide the verdict; informational ones are reported (and compared with the champion).")
    L.append("")
    L.append(_table(["check", "artifact", "value", "threshold", "pass", "gating", "detail"],
                    [[c.name, c.artifact or "candidate", c.value, c.threshold, ("pass" if c.passed else "**FAIL**") if c.gating else "·",
                      "gate" if c.gating else "info", c.detail] for c in checks]))
    L.append("")
    for p in plots:
        L.append(f"![{p[:-4]}]({p})")
        L.append("")

    base_g = ctx["base_golden"]
    L.append(f"## Golden set ({len(inp.golden)} cases, {sum(c.critical for c in inp.golden)} critical)")
    L.append("")
    arts = [a for a, e in evals.items() if not e.error]
    L.append(_table(["artifact", "pass rate", "mean score", "critical failures"],
                    [["base (reference)", base_g.pass_rate, base_g.mean_score, ", ".join(base_g.critical_failures) or "none"]]
                    + [[a, evals[a].golden.pass_rate, evals[a].golden.mean_score,
                        ", ".join(evals[a].golden.critical_failures) or "none"] for a in arts]))
    L.append("")
    L.append("Per case (P = pass, s = soft, F = fail; ★ = critical):")
    L.append("")
    mark = {"pass": "P", "soft": "s", "fail": "F"}
    rows = []
    for i, case in enumerate(inp.golden):
        rows.append([("★ " if case.critical else "") + case.id, mark[base_g.cases[i].status]]
                    + [mark[evals[a].golden.cases[i].status] for a in arts])
    L.append(_table(["case", "base"] + arts, rows))
    L.append("")
    if arts:
        first = arts[0]
        L.append(f"<details><summary>Answers of {first}</summary>\n")
        for r in evals[first].golden.cases:
            L.append(f"- **{r.id}** ({r.status}, {r.score:.2f}): {_cell(r.answer[:200])}  \n  _{'; '.join(r.details)}_")
        L.append("\n</details>")
        L.append("")

    L.append("## Perplexity on held-out text")
    L.append("")
    n_tok = sum(len(r) for r in inp.records)
    L.append(f"{len(inp.records)} held-out records, {n_tok} tokens. The fine-tune must be better than the base by "
             f"more than {recipe.eval_gate.perplexity.margin:.1%}.")
    L.append("")
    L.append(_table(["model", "perplexity"], [["base", ctx["base"]["ppl"]]]
                    + [[a, e.ppl] for a, e in evals.items() if e.ppl is not None]))
    L.append("")

    if tables["drift"]:
        L.append("## Quantization drift (vs the full-precision parent, same tokens)")
        L.append("")
        L.append(_table(["artifact", "type", "parent", "mean KLD", "max", "top-1 agreement", "min", "ppl ratio", "max",
                         "tokens"],
                        [[r["artifact"], r["type"], r["parent"], r["kld"], r["limit"].max_kld, r["top1"],
                          r["limit"].min_top1, r["ppl_ratio"], r["limit"].max_ppl_ratio, r["tokens"]]
                         for r in tables["drift"]]))
        L.append("")

    L.append("## Safety")
    L.append("")
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(inp.redteam):
        by_cat.setdefault(r.category, []).append(i)
    from .golden import is_refusal

    base_red = ctx["base"]["redteam_answers"]
    header = ["category", "prompts", "base"] + arts
    rows = []
    for cat, idx in by_cat.items():
        rows.append([cat, len(idx), f"{sum(is_refusal(base_red[i]) for i in idx)}/{len(idx)}"]
                    + [f"{sum(is_refusal(evals[a].redteam_answers[i]) for i in idx)}/{len(idx)}" for a in arts])
    L.append("Refusals on the red-team set (jailbreaks, prompt injection, requests for personal data):")
    L.append("")
    L.append(_table(header, rows))
    L.append("")
    if tables["canary_hits"]:
        L.append(f"**PII canaries leaked** ({len(tables['canary_hits'])}):")
        L.append("")
        L.append(_table(["artifact", "canary type", "where"],
                        [[h["artifact"], h["type"], h["source"]] for h in tables["canary_hits"][:30]]))
    else:
        L.append(f"No answer of any artifact contains one of the {len(inp.canaries)} PII canaries.")
    L.append("")

    if tables["latency"]:
        L.append("## Latency and throughput (llama.cpp, this machine, golden prompts)")
        L.append("")
        L.append(_table(["artifact", "TTFT p50 ms", "TTFT p95 ms", "tokens/s p50", "tokens/s p5"],
                        [[r["artifact"], r["ttft_p50"], r["ttft_p95"], r["tps_p50"], r["tps_p5"]] for r in tables["latency"]]))
        L.append("")
        cost = recipe.eval_gate.cost
        L.append(f"## Cost (informational; ${cost.gpu_hour_usd}/hour machine, API ${cost.api_usd_per_million_tokens}/1M tokens)")
        L.append("")
        L.append("Self-hosted cost assumes one stream at the measured median speed; break-even is the daily volume "
                 "above which a dedicated machine (paid 24 h/day) costs less than the API.")
        L.append("")
        L.append(_table(["artifact", "tokens/s", "self-hosted $/1M tokens", "API $/1M tokens", "break-even tokens/day",
                         "capacity tokens/day"],
                        [[r["artifact"], r["tokens_per_s"], r["self_hosted_usd_per_mtok"], cost.api_usd_per_million_tokens,
                          r["break_even_tokens_per_day"], r["capacity_tokens_per_day"]] for r in tables["cost"]]))
        L.append("")

    L.append("## Champion")
    L.append("")
    champ = tables["champion"]
    if champ is None:
        L.append(next(c.detail for c in checks if c.name == "champion_regressions"))
    else:
        L.append(f"Compared with {champ['model']} v{champ['version']} (@{champ['alias']}): worse by more than the "
                 "allowed slack (max of absolute and relative tolerance) counts as a regression.")
        L.append("")
        L.append(_table(["metric", "champion", "candidate", "worse by", "allowed", "regressed"],
                        [[r["metric"], r["champion"], r["candidate"], r["worse_by"], r["allowed"],
                          "**yes**" if r["regressed"] else "no"] for r in champ["rows"]]))
    L.append("")
    (out_dir / "report.md").write_text("\n".join(L), encoding="utf-8")
    (out_dir / "report.html").write_text(markdown_to_html("\n".join(L), out_dir), encoding="utf-8")


def markdown_to_html(md: str, image_dir: Path) -> str:
    """The report's own markdown subset as one self-contained HTML page (plots inlined), because the MLflow
    UI renders .html artifacts but shows .md as plain text."""
    import base64
    import html
    import re

    def inline(text: str) -> str:
        t = html.escape(text, quote=False)
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
        return re.sub(r"(?<![\w*])_(.+?)_(?![\w*])", r"<i>\1</i>", t)

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [p.strip().replace("\\|", "|") for p in parts]

    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            head = cells(line)
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
            continue
        elif m := re.match(r"!\[(.*?)\]\((.+?)\)", line):
            data = base64.b64encode((image_dir / m.group(2)).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("- "):
            items = []
            while i < len(lines) and (lines[i].startswith("- ") or lines[i].startswith("  ")):
                if lines[i].startswith("- "):
                    items.append(inline(lines[i][2:]))
                else:
                    items[-1] += "<br>" + inline(lines[i].strip())
                i += 1
            out.append("<ul>" + "".join(f"<li>{x}</li>" for x in items) + "</ul>")
            continue
        elif line.startswith("<details>") or line.startswith("</details>"):
            out.append(line.replace("\n", ""))
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto;font-size:14px}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(out)}</body></html>"
