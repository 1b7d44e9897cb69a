"""From evaluations to the verdict: every check, plus the tables the report shows beside them, in one GateResult."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from recipes import Recipe
from workbench.chat import PARITY_CONVERSATIONS, rendering_difference

from . import checks as C
from .evaluate import ArtifactEval, Evaluation
from .golden import canary_hits, contaminated_cases, is_refusal
from .inputs import Artifact, Inputs


@dataclass
class DriftRow:
    artifact: str
    type: str
    parent: str
    drift: C.Drift
    limit: Any  # recipes.sections.eval_gate.DriftLimit


@dataclass
class LatencyRow:
    artifact: str
    ttft_ms: list[float]
    tokens_per_s: list[float]

    @property
    def ttft_p50(self) -> float:
        return C.percentile(self.ttft_ms, 50)

    @property
    def ttft_p95(self) -> float:
        return C.percentile(self.ttft_ms, 95)

    @property
    def tps_p50(self) -> float:
        return C.percentile(self.tokens_per_s, 50)

    @property
    def tps_p5(self) -> float:
        return C.percentile(self.tokens_per_s, 5)


@dataclass
class ChampionComparison:
    model: str
    version: str | None  # None: there is no champion to compare with
    alias: str
    rows: list[dict[str, Any]]  # checks.compare_to_champion
    note: str


@dataclass
class GateResult:
    """What the gate found: the inputs, every evaluation, every check, and the tables behind them."""

    recipe: Recipe
    inputs: Inputs
    evaluation: Evaluation
    checks: list[C.Check] = field(default_factory=list)
    drift: list[DriftRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    cost: list[dict[str, Any]] = field(default_factory=list)  # {"artifact", "tokens_per_s", **checks.cost()}
    canary_hits: list[dict[str, str]] = field(default_factory=list)
    champion: ChampionComparison | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[C.Check]:
        return [c for c in self.checks if c.gating and not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def verdict(self) -> dict[str, Any]:
        from .endpoints import verdict_entries

        base = self.evaluation.base
        return {"passed": self.passed, "candidate_manifest_sha256": self.inputs.candidate_sha256,
                "failed": [c.metric for c in self.failed], "checks": [c.to_json() for c in self.checks],
                "base": {"golden_pass_rate": base.golden.pass_rate, "golden_mean_score": base.golden.mean_score,
                         "refusal_rate": base.refusal_rate, "overrefusal_rate": base.overrefusal_rate,
                         "perplexity": base.ppl},
                **verdict_entries(self.evaluation)}

    def metrics(self) -> dict[str, float]:
        return {c.metric: float(c.value) for c in self.checks if c.value is not None and math.isfinite(float(c.value))}


def judge(recipe: Recipe, inp: Inputs, evaluation: Evaluation) -> GateResult:
    """Every check of the verdict, artifact by artifact, then the comparison with the champion."""
    cfg = recipe.eval_gate
    result = GateResult(recipe, inp, evaluation)
    contaminated = contaminated_cases(inp.golden, inp.training_texts, cfg.golden.decontam_ngram,
                                      cfg.golden.decontam_threshold)
    result.checks.append(C.at_most(
        "golden_contaminated_cases", None, len(contaminated), 0,
        detail=("in training data: " + ", ".join(contaminated)) if contaminated else
        f"no golden prompt shares >= {cfg.golden.decontam_threshold:.0%} of its {cfg.golden.decontam_ngram}-grams "
        "with clean/train"))
    for art in inp.artifacts:
        ev = evaluation.artifacts[art.name]
        if ev.error:
            result.checks.append(C.Check(name="loads", artifact=art.name, value=0.0, threshold=1.0, passed=False,
                                         gating=True, detail=ev.error))
            continue
        result.checks += quality_checks(recipe, art.name, ev, evaluation)
        result.checks += safety_checks(recipe, inp, art.name, ev, evaluation, result.canary_hits)
        if art.format in ("gguf", "gguf-lora"):
            result.checks += serving_checks(recipe, inp, art.name, ev, result)
        if art.parent is not None and art.quant_type is not None:
            result.checks += drift_checks(recipe, art, ev, evaluation, result.drift)
    from .endpoints import endpoint_checks
    from .load import load_checks

    result.checks += endpoint_checks(recipe, evaluation) + load_checks(recipe, evaluation.load)
    result.champion = compare_with_champion(recipe, result.checks)
    result.checks.append(champion_check(result.champion))
    return result


def quality_checks(recipe: Recipe, a: str, ev: ArtifactEval, evaluation: Evaluation) -> list[C.Check]:
    cfg = recipe.eval_gate
    g, base_ppl = ev.golden, evaluation.base.ppl
    out = [C.at_least("golden_pass_rate", a, g.pass_rate, cfg.golden.min_pass_rate),
           C.at_least("golden_mean_score", a, g.mean_score, cfg.golden.min_mean_score),
           C.at_most("golden_critical_failures", a, len(g.critical_failures), 0, detail=", ".join(g.critical_failures))]
    if cfg.golden.min_gain_over_base is not None:
        out.append(gain_check(a, ev, evaluation, cfg.golden.min_gain_over_base, cfg.golden.gain_max_p_value))
    if ev.ppl is not None:
        gain = 1.0 - ev.ppl / base_ppl
        out.append(C.Check(name="perplexity_gain", artifact=a, value=gain, threshold=cfg.perplexity.margin,
                           passed=gain > cfg.perplexity.margin, gating=True, better="higher",
                           detail=f"perplexity {ev.ppl:.3f} vs base {base_ppl:.3f}"))
        out.append(C.info("perplexity", a, ev.ppl, better="lower"))
    return out


def gain_check(a: str, ev: ArtifactEval, evaluation: Evaluation, min_gain: float, max_p: float) -> C.Check:
    """The point of fine-tuning: better than the base on the domain's own cases, by a margin, significantly."""
    pg = C.paired_gain([c.status == "pass" for c in ev.golden.cases],
                       [c.status == "pass" for c in evaluation.base.golden.cases])
    return C.Check(name="golden_gain_over_base", artifact=a, value=pg.gain, threshold=min_gain,
                   passed=pg.gain >= min_gain and pg.p_value <= max_p, gating=True, better="higher",
                   detail=f"pass rate {ev.golden.pass_rate:.2f} vs base {evaluation.base.golden.pass_rate:.2f}: "
                          f"{pg.describe()} (needs p <= {max_p})")


def safety_checks(recipe: Recipe, inp: Inputs, a: str, ev: ArtifactEval, evaluation: Evaluation,
                  hits_table: list[dict]) -> list[C.Check]:
    cfg, base = recipe.eval_gate, evaluation.base
    floor = max(0.0, base.refusal_rate - cfg.safety.refusal_tolerance)
    ceiling = min(1.0, base.overrefusal_rate + cfg.safety.overrefusal_tolerance)
    refused = [r.id for r, answer in zip(inp.overrefusal, ev.overrefusal_answers) if is_refusal(answer)]
    hits = canary_hits(inp.canaries, {"golden": [c.answer for c in ev.golden.cases], "redteam": ev.redteam_answers,
                                      "overrefusal": ev.overrefusal_answers})
    hits_table += [{"artifact": a, **h} for h in hits]
    return [C.at_least("refusal_rate", a, ev.refusal_rate, floor,
                       detail=f"base refuses {base.refusal_rate:.0%} of {len(inp.redteam)} red-team prompts"),
            C.at_most("overrefusal_rate", a, ev.overrefusal_rate, ceiling,
                      detail=f"base refuses {base.overrefusal_rate:.0%} of {len(inp.overrefusal)} harmless prompts"
                             + (f"; refused: {', '.join(refused)}" if refused else "")),
            C.at_most("pii_canary_leaks", a, len(hits), 0,
                      detail="; ".join(f"{h['type']} in {h['source']}" for h in hits[:5]))]


def serving_checks(recipe: Recipe, inp: Inputs, a: str, ev: ArtifactEval, result: GateResult) -> list[C.Check]:
    """What llama.cpp serves: the embedded chat template, latency, and the cost table."""
    cfg = recipe.eval_gate
    why = rendering_difference(inp.tokenizer, ev.chat_template,
                               [c.messages() for c in inp.golden[:3]] + PARITY_CONVERSATIONS[1:])
    out = [C.Check(name="chat_template_match", artifact=a, value=float(why is None), threshold=1.0,
                   passed=why is None, gating=True, better="higher",
                   detail=f"the GGUF: {why}" if why else "renders the same prompts as train/adapter's template")]
    if not ev.ttft_ms:
        return out
    row = LatencyRow(a, ev.ttft_ms, ev.tokens_per_s)
    result.latency.append(row)
    lat = cfg.latency
    out.append(C.at_most("latency_p95_ttft_ms", a, row.ttft_p95, lat.max_p95_ttft_ms) if lat.max_p95_ttft_ms
               else C.info("latency_p95_ttft_ms", a, row.ttft_p95, better="lower"))
    out.append(C.at_least("tokens_per_s_p5", a, row.tps_p5, lat.min_p5_tokens_per_s) if lat.min_p5_tokens_per_s
               else C.info("tokens_per_s_p5", a, row.tps_p5, better="higher"))
    cost = C.cost(row.tps_p50, cfg.cost.gpu_hour_usd, cfg.cost.api_usd_per_million_tokens)
    out.append(C.info("cost_self_hosted_usd_per_mtok", a, cost["self_hosted_usd_per_mtok"], better="lower"))
    out.append(C.info("cost_break_even_tokens_per_day", a, cost["break_even_tokens_per_day"]))
    result.cost.append({"artifact": a, "tokens_per_s": row.tps_p50, **cost})
    return out


def drift_checks(recipe: Recipe, art: Artifact, ev: ArtifactEval, evaluation: Evaluation,
                 table: list[DriftRow]) -> list[C.Check]:
    a, limit = art.name, recipe.eval_gate.drift.limits[art.quant_type]
    parent = evaluation.artifacts.get(art.parent)
    if parent is None or parent.logprobs is None or ev.logprobs is None:
        missing = art.parent if ev.logprobs is not None else a
        return [C.Check(name="kld", artifact=a, value=None, threshold=limit.max_kld, passed=False, gating=True,
                        better="lower", detail=f"no log-probs for {missing}")]
    d = C.drift(parent.logprobs, ev.logprobs, evaluation.drift_records)
    table.append(DriftRow(a, art.quant_type, art.parent, d, limit))
    half = 1.96 * math.sqrt(d.top1 * (1 - d.top1) / d.tokens)  # binomial 95% interval of the share
    return [C.at_most("kld", a, d.kld, limit.max_kld, detail=f"vs {art.parent}, {d.tokens} tokens"),
            C.at_least("top1_agreement", a, d.top1, limit.min_top1,
                       detail=f"vs {art.parent}, +-{half:.3f} (95%, {d.tokens} tokens)"),
            C.at_most("ppl_ratio", a, d.ppl_ratio, limit.max_ppl_ratio, detail=f"vs {art.parent}")]


def compare_with_champion(recipe: Recipe, checks: list[C.Check]) -> ChampionComparison:
    """This candidate's metrics against the `metric.*` tags of the version under the champion alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from workbench.tracking import setup_mlflow

    cfg = recipe.eval_gate.champion
    setup_mlflow(recipe)
    name = recipe.registry.model_name
    try:
        version = MlflowClient().get_model_version_by_alias(name, cfg.alias)
    except MlflowException:
        return ChampionComparison(name, None, cfg.alias, [], f"skipped: no version of {name!r} under alias @{cfg.alias}")
    champ = {}
    for k, v in (version.tags or {}).items():
        if k.startswith("metric."):
            try:
                champ[k[len("metric."):]] = float(v)
            except ValueError:
                continue
    rows = C.compare_to_champion(checks, champ, cfg.absolute, cfg.relative, cfg.per_metric, cfg.ignore)
    bad = [r["metric"] for r in rows if r["regressed"]]
    note = (f"vs {name} v{version.version} (@{cfg.alias}), {len(rows)} metrics compared"
            + (": worse on " + ", ".join(bad) if bad else ""))
    if not rows:
        note += "; the champion has no comparable metric.* tags"
    return ChampionComparison(name, str(version.version), cfg.alias, rows, note)


def champion_check(champion: ChampionComparison) -> C.Check:
    if champion.version is None:
        return C.Check(name="champion_regressions", artifact=None, value=None, threshold=0, passed=True,
                       gating=False, detail=champion.note)
    bad = [r for r in champion.rows if r["regressed"]]
    return C.at_most("champion_regressions", None, len(bad), 0, detail=champion.note)
