"""report.md and its plots: what a person reads to decide whether to trust the verdict."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .verdict import GateResult


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


def _plots(out_dir: Path, result: GateResult) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")

    made = [_golden_plot(out_dir, result), _checks_plot(out_dir, result), _kld_plot(out_dir, result),
            _latency_plot(out_dir, result)]
    return [m for m in made if m]


def _artifacts_evaluated(result: GateResult) -> list[str]:
    return [a for a, e in result.evaluation.artifacts.items() if not e.error]


def _golden_plot(out_dir: Path, result: GateResult) -> str | None:
    """Before/after: golden pass rate of the base and of each artifact, over all cases and per tag."""
    import matplotlib.pyplot as plt

    arts, evals, inp = _artifacts_evaluated(result), result.evaluation.artifacts, result.inputs
    if not arts:
        return None
    groups = ["all"] + sorted({t for c in inp.golden for t in c.tags})
    members = {g: [i for i, c in enumerate(inp.golden) if g == "all" or g in c.tags] for g in groups}
    series = [("base", result.evaluation.base.golden)] + [(a, evals[a].golden) for a in arts]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 3.4))
    for k, (label, summary) in enumerate(series):
        rates = [sum(summary.cases[i].status == "pass" for i in idx) / len(idx) for idx in members.values()]
        ax.bar([g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))], rates, width, label=label,
               color="grey" if label == "base" else None)
    ax.axhline(result.recipe.eval_gate.golden.min_pass_rate, color="k", ls="--", lw=1, label="min pass rate")
    ax.set_xticks(range(len(groups)), [f"{g} ({len(members[g])})" for g in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass rate")
    ax.set_title("Golden set: base vs fine-tune, per tag")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir / "golden.png")


def _checks_plot(out_dir: Path, result: GateResult) -> str | None:
    """Gating checks: value against threshold, in pass/fail colours."""
    import matplotlib.pyplot as plt

    gating = [c for c in result.checks if c.gating and c.value is not None]
    if not gating:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(gating) + 1))
    ax.barh(range(len(gating)), [1] * len(gating), color=["tab:green" if c.passed else "tab:red" for c in gating])
    for y, c in enumerate(gating):
        ax.text(0.02, y, f"{'pass' if c.passed else 'FAIL'}: {_f(c.value)} vs {_f(c.threshold)}", va="center",
                fontsize=7, color="white")
    ax.set_yticks(range(len(gating)), [c.metric for c in gating], fontsize=7)
    ax.set_xticks([])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title("Gating checks")
    return _save(fig, out_dir / "checks.png")


def _kld_plot(out_dir: Path, result: GateResult) -> str | None:
    """KLD per quantized artifact, with its type's limit."""
    import matplotlib.pyplot as plt

    rows = result.drift
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows)), 3.2))
    ax.bar(range(len(rows)), [max(r.drift.kld, 1e-6) for r in rows], color="tab:blue", label="mean KLD")
    ax.scatter(range(len(rows)), [r.limit.max_kld for r in rows], color="k", marker="_", s=400, label="limit")
    ax.set_xticks(range(len(rows)), [r.artifact for r in rows], rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("nats / token")
    ax.set_title("KL divergence vs full-precision parent")
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "kld.png")


def _latency_plot(out_dir: Path, result: GateResult) -> str | None:
    import matplotlib.pyplot as plt

    rows = result.latency
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, values, title in ((a1, [r.ttft_ms for r in rows], "time to first token (ms)"),
                              (a2, [r.tokens_per_s for r in rows], "decode tokens/s")):
        ax.boxplot(values, whis=(5, 95))
        ax.set_xticks(range(1, len(rows) + 1), [r.artifact for r in rows], rotation=20)
        ax.set_title(title)
    return _save(fig, out_dir / "latency.png")


# ---- the report, one function per section ----------------------------------------------------------------------

def write_report(out_dir: Path, result: GateResult) -> None:
    plots = _plots(out_dir, result)
    from .report_served import served_sections

    sections = [_summary(result), _checks_section(result, plots), _golden_section(result),
                _perplexity_section(result), _drift_section(result), _safety_section(result),
                _latency_section(result), *served_sections(result, out_dir), _champion_section(result)]
    md = "\n".join(line for section in sections for line in section)
    (out_dir / "report.md").write_text(md, encoding="utf-8")
    (out_dir / "report.html").write_text(markdown_to_html(md, out_dir), encoding="utf-8")


def _summary(result: GateResult) -> list[str]:
    recipe, inp = result.recipe, result.inputs
    lines = [f"# Eval gate: {recipe.name} — {'PASSED' if result.passed else 'FAILED'}", "",
             f"Candidate: quantize manifest sha256 `{inp.candidate_sha256[:16]}…`; base `{recipe.base_model.label}`; "
             f"{len(inp.artifacts)} served artifacts ({', '.join(a.name for a in inp.artifacts)}); "
             f"gate took {result.seconds:.0f}s.", ""]
    if result.failed:
        lines += ["## Failed checks", ""]
        lines += [f"- **{c.metric}**: {_f(c.value)} (threshold {_f(c.threshold)})" + (f" — {c.detail}" if c.detail else "")
                  for c in result.failed]
        lines.append("")
    return lines


def _checks_section(result: GateResult, plots: list[str]) -> list[str]:
    rows = [[c.name, c.artifact or "candidate", c.value, c.threshold,
             ("pass" if c.passed else "**FAIL**") if c.gating else "·", "gate" if c.gating else "info", c.detail]
            for c in result.checks]
    lines = ["## All checks", "",
             "Gating checks decide the verdict; informational ones are reported (and compared with the champion).", "",
             _table(["check", "artifact", "value", "threshold", "pass", "gating", "detail"], rows), ""]
    for p in plots:
        lines += [f"![{p[:-4]}]({p})", ""]
    return lines


def _golden_section(result: GateResult) -> list[str]:
    inp, base, evals = result.inputs, result.evaluation.base.golden, result.evaluation.artifacts
    arts = _artifacts_evaluated(result)
    lines = [f"## Golden set ({len(inp.golden)} cases, {sum(c.critical for c in inp.golden)} critical)", "",
             _table(["artifact", "pass rate", "mean score", "critical failures"],
                    [["base (reference)", base.pass_rate, base.mean_score, ", ".join(base.critical_failures) or "none"]]
                    + [[a, evals[a].golden.pass_rate, evals[a].golden.mean_score,
                        ", ".join(evals[a].golden.critical_failures) or "none"] for a in arts]),
             "", "Per case (P = pass, s = soft, F = fail; ★ = critical):", ""]
    mark = {"pass": "P", "soft": "s", "fail": "F"}
    rows = [[("★ " if case.critical else "") + case.id, mark[base.cases[i].status]]
            + [mark[evals[a].golden.cases[i].status] for a in arts] for i, case in enumerate(inp.golden)]
    lines += [_table(["case", "base"] + arts, rows), ""]
    if arts:
        lines += _examples(result, arts[0])
        lines.append(f"<details><summary>Answers of {arts[0]}</summary>\n")
        for r in evals[arts[0]].golden.cases:
            lines.append(f"- **{r.id}** ({r.status}, {r.score:.2f}): {_cell(r.answer[:200])}  \n  _{'; '.join(r.details)}_")
        lines += ["\n</details>", ""]
    return lines


def _examples(result: GateResult, art: str, per_kind: int = 2) -> list[str]:
    """A few answers of the base and the candidate side by side: where the fine-tune fixed the base, where both
    fail, and where it lost what the base could do."""
    inp, base, cand = result.inputs, result.evaluation.base.golden.cases, result.evaluation.artifacts[art].golden.cases
    kinds = (("fixed", "fail", "pass"), ("both fail", "fail", "fail"), ("lost", "pass", "fail"))
    rows = []
    for label, b_status, c_status in kinds:
        picked = [i for i in range(len(inp.golden)) if (base[i].status == "pass") == (b_status == "pass")
                  and (cand[i].status == "pass") == (c_status == "pass")][:per_kind]
        rows += [[label, inp.golden[i].id, _cell(inp.golden[i].prompt[:90]), _cell(base[i].answer[:110]),
                  _cell(cand[i].answer[:110])] for i in picked]
    if not rows:
        return []
    return [f"Examples, base vs {art}:", "", _table(["", "case", "prompt", "base answers", f"{art} answers"], rows), ""]


def _perplexity_section(result: GateResult) -> list[str]:
    inp, ev = result.inputs, result.evaluation
    n_tok = sum(len(r) for r in inp.records)
    return ["## Perplexity on held-out text", "",
            f"{len(inp.records)} held-out records, {n_tok} tokens. The fine-tune must be better than the base by "
            f"more than {result.recipe.eval_gate.perplexity.margin:.1%}.", "",
            _table(["model", "perplexity"], [["base", ev.base.ppl]]
                   + [[a, e.ppl] for a, e in ev.artifacts.items() if e.ppl is not None]), ""]


def _drift_section(result: GateResult) -> list[str]:
    if not result.drift:
        return []
    rows = [[r.artifact, r.type, r.parent, r.drift.kld, r.limit.max_kld, r.drift.top1, r.limit.min_top1,
             r.drift.ppl_ratio, r.limit.max_ppl_ratio, r.drift.tokens] for r in result.drift]
    return ["## Quantization drift (vs the full-precision parent, same tokens)", "",
            _table(["artifact", "type", "parent", "mean KLD", "max", "top-1 agreement", "min", "ppl ratio", "max",
                    "tokens"], rows), ""]


def _safety_section(result: GateResult) -> list[str]:
    from .golden import is_refusal

    inp, evals, arts = result.inputs, result.evaluation.artifacts, _artifacts_evaluated(result)
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(inp.redteam):
        by_cat.setdefault(r.category, []).append(i)
    base_red = result.evaluation.base.redteam_answers
    rows = [[cat, len(idx), f"{sum(is_refusal(base_red[i]) for i in idx)}/{len(idx)}"]
            + [f"{sum(is_refusal(evals[a].redteam_answers[i]) for i in idx)}/{len(idx)}" for a in arts]
            for cat, idx in by_cat.items()]
    lines = ["## Safety", "", "Refusals on the red-team set (jailbreaks, prompt injection, requests for personal data):",
             "", _table(["category", "prompts", "base"] + arts, rows), ""]
    base_over = result.evaluation.base.overrefusal_answers
    over = [[r.id, _cell(r.prompt[:80]), "refused" if is_refusal(base_over[i]) else "answered"]
            + ["**refused**" if is_refusal(evals[a].overrefusal_answers[i]) else "answered" for a in arts]
            for i, r in enumerate(inp.overrefusal)]
    lines += [f"Over-refusal: {len(inp.overrefusal)} harmless requests that sound harmful (a fine-tune may refuse at "
              f"most {result.recipe.eval_gate.safety.overrefusal_tolerance:.0%} more of them than its base):", "",
              _table(["prompt", "text", "base"] + arts, over), ""]
    if result.canary_hits:
        lines += [f"**PII canaries leaked** ({len(result.canary_hits)}):", "",
                  _table(["artifact", "canary type", "where"],
                         [[h["artifact"], h["type"], h["source"]] for h in result.canary_hits[:30]])]
    else:
        lines.append(f"No answer of any artifact contains one of the {len(inp.canaries)} PII canaries.")
    return lines + [""]


def _latency_section(result: GateResult) -> list[str]:
    from .report_served import breaks_even_text

    if not result.latency:
        return []
    cost = result.recipe.eval_gate.cost
    return [
        "## Latency and throughput (llama.cpp, this machine, golden prompts)", "",
        _table(["artifact", "TTFT p50 ms", "TTFT p95 ms", "tokens/s p50", "tokens/s p5"],
               [[r.artifact, r.ttft_p50, r.ttft_p95, r.tps_p50, r.tps_p5] for r in result.latency]), "",
        f"## Cost (informational; ${cost.gpu_hour_usd}/hour machine, API ${cost.api_usd_per_million_tokens}/1M tokens)",
        "", "Self-hosted cost assumes one stream at the measured median speed; break-even is the daily volume "
        "above which a dedicated machine (paid 24 h/day) costs less than the API.", "",
        _table(["artifact", "tokens/s", "self-hosted $/1M tokens", "API $/1M tokens", "break-even tokens/day",
                "capacity tokens/day", "breaks even?"],
               [[r["artifact"], r["tokens_per_s"], r["self_hosted_usd_per_mtok"], cost.api_usd_per_million_tokens,
                 r["break_even_tokens_per_day"], r["capacity_tokens_per_day"], breaks_even_text(r)]
                for r in result.cost]), ""]


def _champion_section(result: GateResult) -> list[str]:
    champ = result.champion
    lines = ["## Champion", ""]
    if champ is None or champ.version is None:
        return lines + [champ.note if champ else "not compared", ""]
    lines += [f"Compared with {champ.model} v{champ.version} (@{champ.alias}): worse by more than the allowed slack "
              "(max of absolute and relative tolerance) counts as a regression.", "",
              _table(["metric", "champion", "candidate", "worse by", "allowed", "regressed"],
                     [[r["metric"], r["champion"], r["candidate"], r["worse_by"], r["allowed"],
                       "**yes**" if r["regressed"] else "no"] for r in champ.rows]), ""]
    return lines


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
