"""The eval gate: one verdict on the artifacts that will actually be served.

    setup    read the upstream manifests, the golden / red-team / canary sets, held-out text, the tokenizer
    run      base model (cached by its sha256), then every artifact: adapter on base, merged, each GGUF, AWQ
    save     verdict.json + report.md + plots, an MLflow run, the stage manifest; exit 1 when the verdict fails
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes import Recipe
from workbench.workspace import StageError, Workspace, manifest_hash, sha256_file, stage_output

from . import checks as C
from .golden import (SHIPPED_REDTEAM, GoldenSummary, canary_hits, contaminated_cases, is_refusal, load_canaries,
                     load_golden, load_redteam, score_golden)

CACHE_VERSION = 1


def log(msg: str) -> None:
    print(f"[eval_gate] {msg}", flush=True)


@dataclass
class Artifact:
    name: str  # "adapter", "merged", "gguf:Q8_0", "awq"
    format: str  # "peft", "hf", "gguf", "gguf-lora", "compressed-tensors"
    path: Path
    parent: str | None
    lora_base: Path | None = None  # gguf-lora: the F16 base GGUF the adapter (path) is applied to

    @property
    def quant_type(self) -> str | None:
        if self.format == "gguf":
            return self.name.split(":", 1)[1]
        if self.format == "gguf-lora":
            return "F16"  # an F16 adapter on the F16 base: judged against the adapter on base in transformers
        if self.format == "compressed-tensors":
            return "awq"
        return None


@dataclass
class Inputs:
    base_dir: Path
    adapter_dir: Path
    artifacts: list[Artifact]
    candidate_sha256: str
    golden: list
    redteam: list
    canaries: list
    training_texts: list[str]
    records: list[list[int]]  # held-out token ids (adapter tokenizer), perplexity and drift
    golden_sha256: str
    redteam_sha256: str
    tokenizer: Any


@dataclass
class ArtifactEval:
    golden: GoldenSummary
    redteam_answers: list[str]
    refusal_rate: float
    ppl: float | None = None
    logprobs: Any = None  # float16 [N, vocab] over the first drift tokens
    ttft_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    chat_template: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------- setup

def load_inputs(recipe: Recipe, ws: Workspace) -> Inputs:
    from datasets import load_from_disk

    from workbench.base import resolve_base

    from .engines import load_tokenizer

    cfg = recipe.eval_gate
    base_dir = resolve_base(recipe.base_model)
    clean_dir, train_dir, quant_dir = ws.require("clean"), ws.require("train"), ws.require("quantize")
    adapter_dir = train_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StageError(f"{adapter_dir}: no adapter_config.json (the train stage writes the PEFT adapter here)")

    artifacts = [Artifact("adapter", "peft", adapter_dir, None)]
    listed = (ws.manifest("quantize") or {}).get("results", {}).get("artifacts")
    if not isinstance(listed, list):
        raise StageError(f"{quant_dir / 'manifest.json'}: results.artifacts is missing (docs/stages.md, quantize/)")
    for i, a in enumerate(listed):
        try:
            art = Artifact(a["name"], a["format"], quant_dir / a["path"], a.get("parent"),
                           quant_dir / a["base_path"] if a["format"] == "gguf-lora" else None)
        except (KeyError, TypeError):
            raise StageError(f"{quant_dir / 'manifest.json'}: results.artifacts[{i}] lacks name/format/path "
                             f"(gguf-lora: base_path): {a!r}") from None
        for path in (art.path, art.lora_base):
            if path is not None and not path.exists():
                raise StageError(f"{path}: artifact {art.name!r} listed in the quantize manifest does not exist")
        if art.format not in ("hf", "gguf", "gguf-lora", "compressed-tensors"):
            raise StageError(f"{quant_dir / 'manifest.json'}: artifact {art.name!r} has unknown format {art.format!r}")
        if art.quant_type is not None and art.quant_type not in cfg.drift.limits and art.parent is not None:
            raise StageError(f"eval_gate.drift.limits: no limits for quant type {art.quant_type!r} "
                             f"(artifact {art.name}); add them to the recipe")
        artifacts.append(art)
    names = {a.name for a in artifacts}
    for a in artifacts:
        if a.parent is not None and a.parent not in names:
            raise StageError(f"{quant_dir / 'manifest.json'}: artifact {a.name!r} names parent {a.parent!r}, "
                             "which is not listed")

    golden_path = Path(recipe.data.golden)
    redteam_path = Path(cfg.safety.redteam) if cfg.safety.redteam else SHIPPED_REDTEAM
    canaries_path = Path(cfg.safety.canaries)
    tokenizer = load_tokenizer(adapter_dir)

    train_ds = load_from_disk(str(clean_dir / "train"))
    training_texts = [" \n".join(m["content"] for m in msgs) for msgs in train_ds["messages"]]
    heldout = load_from_disk(str(clean_dir / "heldout_text"))
    if "text" not in heldout.column_names:
        raise StageError(f"{clean_dir / 'heldout_text'}: no `text` column (columns: {heldout.column_names})")
    records = []
    for i, text in enumerate(heldout["text"]):
        if len(records) >= cfg.perplexity.max_records:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.perplexity.max_tokens]
        if len(ids) >= 2:
            records.append(ids)
    if not records:
        raise StageError(f"{clean_dir / 'heldout_text'}: no record has 2 or more tokens; perplexity needs held-out text")

    return Inputs(
        base_dir=base_dir, adapter_dir=adapter_dir, artifacts=artifacts,
        candidate_sha256=manifest_hash(quant_dir / "manifest.json"),
        golden=load_golden(golden_path), redteam=load_redteam(redteam_path), canaries=load_canaries(canaries_path),
        training_texts=training_texts, records=records,
        golden_sha256=sha256_file(golden_path), redteam_sha256=sha256_file(redteam_path), tokenizer=tokenizer,
    )


def base_sha256(recipe: Recipe, base_dir: Path) -> str:
    from workbench.base import weight_hashes

    hashes = recipe.base_model.sha256 or weight_hashes(base_dir)
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ run

def _count_tokens(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _drift_records(records: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
    out, n = [], 0
    for r in records:
        if n >= max_tokens:
            break
        r = r[: max_tokens - n]
        if len(r) >= 2:
            out.append(r)
            n += len(r)
    return out, n


def eval_hf(engine, inp: Inputs, recipe: Recipe, drift_tokens: int) -> ArtifactEval:
    cfg = recipe.eval_gate
    t = time.time()
    answers = engine.chat([c.messages() for c in inp.golden], cfg.golden.max_new_tokens, cfg.golden.batch_size)
    red = engine.chat([r.messages() for r in inp.redteam], cfg.safety.max_new_tokens, cfg.golden.batch_size)
    t_gen = time.time() - t
    nll, count, lp = engine.score(inp.records, keep_logprobs_tokens=drift_tokens)
    log(f"  generation {t_gen:.1f}s, scoring {time.time() - t - t_gen:.1f}s")
    return ArtifactEval(
        golden=score_golden(inp.golden, answers, _count_tokens(inp.tokenizer)), redteam_answers=red,
        refusal_rate=sum(map(is_refusal, red)) / len(red), ppl=math.exp(nll / count), logprobs=lp,
    )


def eval_base(recipe: Recipe, inp: Inputs, engine) -> dict[str, Any]:
    """Base-model golden answers, red-team refusals and perplexity; cached by the base's sha256."""
    cfg = recipe.eval_gate
    sha = base_sha256(recipe, inp.base_dir)
    settings = {
        "version": CACHE_VERSION, "golden": inp.golden_sha256, "redteam": inp.redteam_sha256,
        "chat_template": hashlib.sha256(inp.tokenizer.chat_template.encode()).hexdigest(),
        "records": hashlib.sha256(json.dumps(inp.records).encode()).hexdigest(),
        "golden_max_new_tokens": cfg.golden.max_new_tokens, "safety_max_new_tokens": cfg.safety.max_new_tokens,
        "batch_size": cfg.golden.batch_size, "dtype": recipe.base_model.dtype,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_file = Path(recipe.workspace).resolve() / ".cache" / "eval_base" / f"{sha}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key in cache:
        log(f"base: cached results ({cache_file.name})")
        return cache[key]
    log("base: evaluating (cached afterwards by the base's sha256)")
    ev = eval_hf(engine, inp, recipe, drift_tokens=0)
    result = {"golden_answers": [c.answer for c in ev.golden.cases], "redteam_answers": ev.redteam_answers,
              "refusal_rate": ev.refusal_rate, "ppl": ev.ppl, "settings": settings}
    cache[key] = result
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, cache_file)
    return result


def _unloadable(inp: Inputs, error: str) -> ArtifactEval:
    return ArtifactEval(score_golden(inp.golden, [""] * len(inp.golden), lambda s: 0), [], 0.0, error=error)


def gguf_job(recipe: Recipe, inp: Inputs, drift: list[list[int]]) -> dict[str, Any]:
    cfg = recipe.eval_gate
    threads = cfg.latency.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    return {
        "threads": threads, "n_ctx": cfg.latency.n_ctx, "records": drift,
        "chats": {
            "golden": {"conversations": [c.messages() for c in inp.golden],
                       "max_new_tokens": cfg.golden.max_new_tokens, "timed": True},
            "redteam": {"conversations": [r.messages() for r in inp.redteam],
                        "max_new_tokens": cfg.safety.max_new_tokens},
        },
    }


def evaluate(recipe: Recipe, inp: Inputs, scratch: Path) -> tuple[dict[str, Any], dict[str, ArtifactEval]]:
    import numpy as np

    from .engines import HFEngine, run_gguf

    cfg = recipe.eval_gate
    drift, drift_n = _drift_records(inp.records, cfg.drift.max_tokens)
    evals: dict[str, ArtifactEval] = {}

    t = time.time()
    base_engine = HFEngine.from_dir(inp.base_dir, inp.tokenizer, recipe.base_model.dtype)
    base = eval_base(recipe, inp, base_engine)
    log(f"base: {time.time() - t:.1f}s")
    # full-vocabulary log-probs are large: keep them only for the two sides of a drift comparison
    in_drift = {a.name for a in inp.artifacts if a.parent is not None} | {a.parent for a in inp.artifacts if a.parent}
    for art in inp.artifacts:
        t = time.time()
        log(f"{art.name}: evaluating {art.path.name} ({art.format})")
        keep = drift_n if art.name in in_drift else 0
        if art.format == "peft":
            engine = base_engine.with_adapter(art.path)
            evals[art.name] = eval_hf(engine, inp, recipe, keep)
            del engine, base_engine
        elif art.format in ("hf", "compressed-tensors"):
            try:
                engine = HFEngine.from_dir(art.path, inp.tokenizer)
            except StageError as exc:  # an artifact that cannot be loaded is a finding, like a GGUF that aborts
                log(f"  error: {exc}")
                evals[art.name] = _unloadable(inp, str(exc))
                continue
            evals[art.name] = eval_hf(engine, inp, recipe, keep)
            del engine
        else:
            try:
                job = gguf_job(recipe, inp, drift)
                model = art.path
                if art.lora_base is not None:  # llama.cpp serves base + adapter: llama-server -m BASE --lora ADAPTER
                    job, model = {**job, "lora_path": str(art.path)}, art.lora_base
                res = run_gguf(model, art.name, job, scratch / art.name.replace(":", "-"), cfg.gguf_timeout_s)
            except StageError as exc:
                log(f"  error: {exc}")
                evals[art.name] = _unloadable(inp, str(exc))
                continue
            red = res.answers["redteam"]
            evals[art.name] = ArtifactEval(
                golden=score_golden(inp.golden, res.answers["golden"], _count_tokens(inp.tokenizer)),
                redteam_answers=red, refusal_rate=sum(map(is_refusal, red)) / len(red),
                logprobs=np.load(res.logprobs_path) if res.logprobs_path else None,
                ttft_ms=res.ttft_ms, tokens_per_s=res.tokens_per_s, chat_template=res.chat_template,
            )
        log(f"{art.name}: {time.time() - t:.1f}s")
    base_summary = score_golden(inp.golden, base["golden_answers"], _count_tokens(inp.tokenizer))
    return {"base": base, "base_golden": base_summary, "drift_records": drift}, evals


def build_checks(recipe: Recipe, inp: Inputs, base: dict[str, Any], evals: dict[str, ArtifactEval],
                 drift_records: list[list[int]]) -> tuple[list[C.Check], dict[str, Any]]:
    """Every check of the verdict, plus the tables the report shows beside them."""
    cfg = recipe.eval_gate
    checks: list[C.Check] = []
    tables: dict[str, Any] = {"drift": [], "latency": [], "cost": [], "champion": None, "canary_hits": []}

    contaminated = contaminated_cases(inp.golden, inp.training_texts, cfg.golden.decontam_ngram,
                                      cfg.golden.decontam_threshold)
    checks.append(C.at_most("golden_contaminated_cases", None, len(contaminated), 0,
                            detail=("in training data: " + ", ".join(contaminated)) if contaminated else
                            f"no golden prompt shares >= {cfg.golden.decontam_threshold:.0%} of its "
                            f"{cfg.golden.decontam_ngram}-grams with clean/train"))
    templates = _template_renders(inp)
    for art in inp.artifacts:
        ev = evals[art.name]
        a = art.name
        if ev.error:
            checks.append(C.Check("loads", a, 0.0, 1.0, False, True, None, ev.error))
            continue
        g = ev.golden
        checks.append(C.at_least("golden_pass_rate", a, g.pass_rate, cfg.golden.min_pass_rate))
        checks.append(C.at_least("golden_mean_score", a, g.mean_score, cfg.golden.min_mean_score))
        checks.append(C.at_most("golden_critical_failures", a, len(g.critical_failures), 0,
                                detail=", ".join(g.critical_failures)))
        if ev.ppl is not None:
            gain = 1.0 - ev.ppl / base["ppl"]
            checks.append(C.Check("perplexity_gain", a, gain, cfg.perplexity.margin, gain > cfg.perplexity.margin, True,
                                  "higher", f"perplexity {ev.ppl:.3f} vs base {base['ppl']:.3f}"))
            checks.append(C.info("perplexity", a, ev.ppl, better="lower"))
        floor = max(0.0, base["refusal_rate"] - cfg.safety.refusal_tolerance)
        checks.append(C.at_least("refusal_rate", a, ev.refusal_rate, floor,
                                 detail=f"base refuses {base['refusal_rate']:.0%} of {len(inp.redteam)} red-team prompts"))
        hits = canary_hits(inp.canaries, {"golden": [c.answer for c in g.cases], "redteam": ev.redteam_answers})
        tables["canary_hits"] += [{"artifact": a, **h} for h in hits]
        checks.append(C.at_most("pii_canary_leaks", a, len(hits), 0,
                                detail="; ".join(f"{h['type']} in {h['source']}" for h in hits[:5])))
        if art.format in ("gguf", "gguf-lora"):
            ok, why = templates(ev.chat_template)
            checks.append(C.Check("chat_template_match", a, float(ok), 1.0, ok, True, "higher", why))
            if ev.ttft_ms:
                p95_ttft, p50_ttft = C.percentile(ev.ttft_ms, 95), C.percentile(ev.ttft_ms, 50)
                p5_tps, p50_tps = C.percentile(ev.tokens_per_s, 5), C.percentile(ev.tokens_per_s, 50)
                lat = cfg.latency
                checks.append(C.at_most("latency_p95_ttft_ms", a, p95_ttft, lat.max_p95_ttft_ms, True) if lat.max_p95_ttft_ms
                              else C.info("latency_p95_ttft_ms", a, p95_ttft, better="lower"))
                checks.append(C.at_least("tokens_per_s_p5", a, p5_tps, lat.min_p5_tokens_per_s) if lat.min_p5_tokens_per_s
                              else C.info("tokens_per_s_p5", a, p5_tps, better="higher"))
                tables["latency"].append({"artifact": a, "ttft_p50": p50_ttft, "ttft_p95": p95_ttft,
                                          "tps_p50": p50_tps, "tps_p5": p5_tps, "ttft_ms": ev.ttft_ms,
                                          "tokens_per_s": ev.tokens_per_s})
                cst = C.cost(p50_tps, cfg.cost.gpu_hour_usd, cfg.cost.api_usd_per_million_tokens)
                checks.append(C.info("cost_self_hosted_usd_per_mtok", a, cst["self_hosted_usd_per_mtok"], better="lower"))
                checks.append(C.info("cost_break_even_tokens_per_day", a, cst["break_even_tokens_per_day"]))
                tables["cost"].append({"artifact": a, "tokens_per_s": p50_tps, **cst})
        if art.parent is not None and art.quant_type is not None:
            parent = evals.get(art.parent)
            limit = cfg.drift.limits[art.quant_type]
            if parent is None or parent.logprobs is None or ev.logprobs is None:
                checks.append(C.Check("kld", a, None, limit.max_kld, False, True, "lower",
                                      f"no log-probs for {art.parent if ev.logprobs is not None else a}"))
                continue
            d = C.drift(parent.logprobs, ev.logprobs, drift_records)
            checks.append(C.at_most("kld", a, d.kld, limit.max_kld, detail=f"vs {art.parent}, {d.tokens} tokens"))
            half = 1.96 * math.sqrt(d.top1 * (1 - d.top1) / d.tokens)  # binomial 95% interval of the share
            checks.append(C.at_least("top1_agreement", a, d.top1, limit.min_top1,
                                     detail=f"vs {art.parent}, +-{half:.3f} (95%, {d.tokens} tokens)"))
            checks.append(C.at_most("ppl_ratio", a, d.ppl_ratio, limit.max_ppl_ratio, detail=f"vs {art.parent}"))
            tables["drift"].append({"artifact": a, "type": art.quant_type, "parent": art.parent, "kld": d.kld,
                                    "top1": d.top1, "ppl_ratio": d.ppl_ratio, "tokens": d.tokens, "limit": limit})
    checks.append(champion_check(recipe, checks, tables))
    return checks, tables


def _template_renders(inp: Inputs):
    """A function: GGUF-embedded template -> (renders like the adapter's?, why). Compared on rendered text,
    so formatting differences inside the Jinja source do not matter, only what the model would see."""
    tok = inp.tokenizer
    samples = [c.messages() for c in inp.golden[:3]] + [[
        {"role": "system", "content": "You are a Python standard library assistant."},
        {"role": "user", "content": "What does os.getcwd return?"},
        {"role": "assistant", "content": "The current working directory."},
        {"role": "user", "content": "And os.listdir?"},
    ]]
    want = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in samples]

    def check(template: str | None) -> tuple[bool, str]:
        if not template:
            return False, "the GGUF has no tokenizer.chat_template; llama.cpp would fall back to a guess"
        try:
            got = [tok.apply_chat_template(m, chat_template=template, add_generation_prompt=True, tokenize=False)
                   for m in samples]
        except Exception as exc:
            return False, f"the GGUF's chat template does not render: {exc}"
        for w, g in zip(want, got):
            if w != g:
                return False, f"renders {g[:80]!r}... where the adapter's template renders {w[:80]!r}..."
        return True, "renders the same prompts as train/adapter's template"

    return check


def champion_check(recipe: Recipe, checks: list[C.Check], tables: dict[str, Any]) -> C.Check:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from workbench.tracking import setup_mlflow

    cfg = recipe.eval_gate.champion
    setup_mlflow(recipe)
    name = recipe.registry.model_name
    try:
        version = MlflowClient().get_model_version_by_alias(name, cfg.alias)
    except MlflowException:
        return C.Check("champion_regressions", None, None, 0, True, False, None,
                       f"skipped: no version of {name!r} under alias @{cfg.alias}")
    champ = {}
    for k, v in (version.tags or {}).items():
        if k.startswith("metric."):
            try:
                champ[k[len("metric."):]] = float(v)
            except ValueError:
                continue
    rows = C.compare_to_champion(checks, champ, cfg.absolute, cfg.relative, cfg.per_metric, cfg.ignore)
    tables["champion"] = {"model": name, "version": version.version, "alias": cfg.alias, "rows": rows}
    bad = [r["metric"] for r in rows if r["regressed"]]
    detail = (f"vs {name} v{version.version} (@{cfg.alias}), {len(rows)} metrics compared"
              + (": worse on " + ", ".join(bad) if bad else ""))
    if not rows:
        detail += "; the champion has no comparable metric.* tags"
    return C.at_most("champion_regressions", None, len(bad), 0, detail=detail)


# ----------------------------------------------------------------------------------------------- save

def log_to_mlflow(recipe: Recipe, checks: list[C.Check], out_dir: Path, verdict: dict[str, Any]) -> str:
    import mlflow

    from workbench.tracking import setup_mlflow

    setup_mlflow(recipe)
    with mlflow.start_run(run_name=f"eval_gate-{recipe.name}") as run:
        mlflow.set_tags({"stage": "eval_gate", "gate.passed": str(verdict["passed"]).lower(),
                         "candidate_manifest_sha256": verdict["candidate_manifest_sha256"]})
        metrics = {c.metric: float(c.value) for c in checks if c.value is not None and _finite(c.value)}
        mlflow.log_metrics(metrics)
        mlflow.log_metric("gate_passed", float(verdict["passed"]))
        mlflow.log_artifacts(str(out_dir))
        return run.info.run_id


def _finite(x: float) -> bool:
    return math.isfinite(float(x))


def run(recipe: Recipe, args: argparse.Namespace) -> int:
    from .report import write_report

    ws = Workspace(recipe)
    with stage_output(recipe, "eval_gate", force=args.force) as out:
        if out.skipped:
            verdict = json.loads((out.final_dir / "verdict.json").read_text())
            log(f"{out.final_dir} is up to date (use --force to re-run)")
            return _finish(verdict, out.final_dir)
        started = time.time()
        inp = load_inputs(recipe, ws)
        scratch = ws.scratch("eval_gate")
        try:
            ctx, evals = evaluate(recipe, inp, scratch)
            checks, tables = build_checks(recipe, inp, ctx["base"], evals, ctx["drift_records"])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # multi-MB log-prob arrays; nothing to resume from
        failed = [c for c in checks if c.gating and not c.passed]
        verdict = {
            "passed": not failed,
            "candidate_manifest_sha256": inp.candidate_sha256,
            "failed": [c.metric for c in failed],
            "checks": [c.to_json() for c in checks],
        }
        (out.dir / "verdict.json").write_text(json.dumps(verdict, indent=2, default=_json_default))
        write_report(out.dir, recipe, inp, verdict, checks, tables, evals, ctx, time.time() - started)
        run_id = log_to_mlflow(recipe, checks, out.dir, verdict)
        out.results.update({
            "passed": verdict["passed"], "failed": verdict["failed"], "mlflow_run_id": run_id,
            "candidate_manifest_sha256": inp.candidate_sha256,
            "metrics": {c.metric: c.value for c in checks if c.value is not None and _finite(c.value)},
            "seconds": round(time.time() - started, 1),
        })
    return _finish(verdict, ws.stage_dir("eval_gate"))


def _json_default(o):
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _finish(verdict: dict[str, Any], out_dir: Path) -> int:
    if verdict["passed"]:
        log(f"PASSED: {out_dir / 'report.md'}")
        return 0
    print(f"eval_gate: FAILED checks ({len(verdict['failed'])}):", file=sys.stderr)
    for c in verdict["checks"]:
        if c["gating"] and not c["passed"]:
            print(f"  - {c['metric']}: {_fmt(c['value'])} vs threshold {_fmt(c['threshold'])}"
                  + (f" ({c['detail']})" if c.get("detail") else ""), file=sys.stderr)
    print(f"eval_gate: report: {out_dir / 'report.md'}", file=sys.stderr)
    return 1


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
