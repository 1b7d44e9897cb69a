"""Run every model the gate judges: the base (cached by its sha256), then each served artifact: the adapter on the
base and the merged / AWQ models through transformers in this process, every GGUF through llama.cpp in a child."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes import Recipe
from workbench.workspace import StageError

from .golden import GoldenSummary, is_refusal, score_golden
from .inputs import Inputs, base_sha256

CACHE_VERSION = 2  # 2: over-refusal answers


def log(msg: str) -> None:
    print(f"[eval_gate] {msg}", flush=True)


def refusal_rate(answers: list[str]) -> float:
    return sum(map(is_refusal, answers)) / len(answers) if answers else 0.0


@dataclass
class ArtifactEval:
    golden: GoldenSummary
    redteam_answers: list[str]
    refusal_rate: float
    overrefusal_answers: list[str] = field(default_factory=list)
    ppl: float | None = None
    logprobs: Any = None  # float16 [N, vocab] over the first drift tokens
    ttft_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    chat_template: str | None = None
    error: str | None = None

    @property
    def overrefusal_rate(self) -> float:
        return refusal_rate(self.overrefusal_answers)


@dataclass
class BaseEval:
    """The base model's answers and perplexity: the reference every artifact is compared with."""

    golden: GoldenSummary
    redteam_answers: list[str]
    refusal_rate: float
    overrefusal_answers: list[str]
    ppl: float

    @property
    def overrefusal_rate(self) -> float:
        return refusal_rate(self.overrefusal_answers)


@dataclass
class Evaluation:
    base: BaseEval
    artifacts: dict[str, ArtifactEval]  # by artifact name, in the inputs' order
    drift_records: list[list[int]]  # the held-out token ids drift is compared on
    endpoints: dict[str, Any] = field(default_factory=dict)  # eval_gate.endpoints.EndpointEval by name
    load: Any = None  # eval_gate.load.LoadEval when eval_gate.load.enabled


def evaluate(recipe: Recipe, inp: Inputs, scratch: Path) -> Evaluation:
    from .engines import HFEngine

    cfg = recipe.eval_gate
    drift, drift_n = drift_records(inp.records, cfg.drift.max_tokens)
    t = time.time()
    base_engine = HFEngine.from_dir(inp.base_dir, inp.tokenizer, recipe.base_model.dtype)
    base = eval_base(recipe, inp, base_engine)
    log(f"base: {time.time() - t:.1f}s")
    # full-vocabulary log-probs are large: keep them only for the two sides of a drift comparison
    in_drift = {a.name for a in inp.artifacts if a.parent is not None} | {a.parent for a in inp.artifacts if a.parent}
    evals: dict[str, ArtifactEval] = {}
    for art in inp.artifacts:
        t = time.time()
        log(f"{art.name}: evaluating {art.path.name} ({art.format})")
        keep = drift_n if art.name in in_drift else 0
        try:
            if art.format == "peft":
                evals[art.name] = eval_hf(base_engine.with_adapter(art.path), inp, recipe, keep)
                del base_engine  # wrapped by the adapter now; the base's answers are cached
            elif art.format in ("hf", "compressed-tensors"):
                evals[art.name] = eval_hf(HFEngine.from_dir(art.path, inp.tokenizer), inp, recipe, keep)
            else:
                evals[art.name] = eval_gguf(recipe, inp, art, drift, scratch)
        except StageError as exc:  # an artifact that cannot be loaded or run is a finding about the candidate
            log(f"  error: {exc}")
            evals[art.name] = ArtifactEval(score_golden(inp.golden, [""] * len(inp.golden), lambda s: 0), [], 0.0,
                                           error=str(exc))
        log(f"{art.name}: {time.time() - t:.1f}s")
    from .endpoints import evaluate_endpoints
    from .load import run_load_check

    return Evaluation(base, evals, drift, endpoints=evaluate_endpoints(recipe, inp, log),
                      load=run_load_check(recipe, inp, scratch, log))


def drift_records(records: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
    out, n = [], 0
    for r in records:
        if n >= max_tokens:
            break
        r = r[: max_tokens - n]
        if len(r) >= 2:
            out.append(r)
            n += len(r)
    return out, n


def count_tokens(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def eval_hf(engine, inp: Inputs, recipe: Recipe, drift_tokens: int) -> ArtifactEval:
    cfg = recipe.eval_gate
    t = time.time()
    answers = engine.chat([c.messages() for c in inp.golden], cfg.golden.max_new_tokens, cfg.golden.batch_size)
    red = engine.chat([r.messages() for r in inp.redteam], cfg.safety.max_new_tokens, cfg.golden.batch_size)
    over = engine.chat([r.messages() for r in inp.overrefusal], cfg.safety.max_new_tokens, cfg.golden.batch_size)
    t_gen = time.time() - t
    nll, count, lp = engine.score(inp.records, keep_logprobs_tokens=drift_tokens)
    log(f"  generation {t_gen:.1f}s, scoring {time.time() - t - t_gen:.1f}s")
    return ArtifactEval(
        golden=score_golden(inp.golden, answers, count_tokens(inp.tokenizer)), redteam_answers=red,
        refusal_rate=refusal_rate(red), overrefusal_answers=over, ppl=math.exp(nll / count), logprobs=lp,
    )


def eval_gguf(recipe: Recipe, inp: Inputs, art, drift: list[list[int]], scratch: Path) -> ArtifactEval:
    import numpy as np

    from .engines import run_gguf

    cfg = recipe.eval_gate
    threads = cfg.latency.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    job = {
        "threads": threads, "n_ctx": cfg.latency.n_ctx, "records": drift,
        "chats": {
            "golden": {"conversations": [c.messages() for c in inp.golden],
                       "max_new_tokens": cfg.golden.max_new_tokens, "timed": True},
            "redteam": {"conversations": [r.messages() for r in inp.redteam],
                        "max_new_tokens": cfg.safety.max_new_tokens},
            "overrefusal": {"conversations": [r.messages() for r in inp.overrefusal],
                            "max_new_tokens": cfg.safety.max_new_tokens},
        },
    }
    model = art.path
    if art.lora_base is not None:  # llama.cpp serves base + adapter: llama-server -m BASE --lora ADAPTER
        job, model = {**job, "lora_path": str(art.path)}, art.lora_base
    res = run_gguf(model, art.name, job, scratch / art.name.replace(":", "-"), cfg.gguf_timeout_s)
    red = res.answers["redteam"]
    return ArtifactEval(
        golden=score_golden(inp.golden, res.answers["golden"], count_tokens(inp.tokenizer)),
        redteam_answers=red, refusal_rate=refusal_rate(red), overrefusal_answers=res.answers["overrefusal"],
        logprobs=np.load(res.logprobs_path) if res.logprobs_path else None,
        ttft_ms=res.ttft_ms, tokens_per_s=res.tokens_per_s, chat_template=res.chat_template,
    )


def eval_base(recipe: Recipe, inp: Inputs, engine) -> BaseEval:
    """Base-model golden answers, red-team refusals and perplexity; cached by the base's sha256 and every setting
    the answers depend on."""
    cfg = recipe.eval_gate
    settings = {
        "version": CACHE_VERSION, "golden": inp.golden_sha256, "redteam": inp.redteam_sha256,
        "overrefusal": inp.overrefusal_sha256,
        "chat_template": hashlib.sha256(inp.tokenizer.chat_template.encode()).hexdigest(),
        "records": hashlib.sha256(json.dumps(inp.records).encode()).hexdigest(),
        "golden_max_new_tokens": cfg.golden.max_new_tokens, "safety_max_new_tokens": cfg.safety.max_new_tokens,
        "batch_size": cfg.golden.batch_size, "dtype": recipe.base_model.dtype,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    cache_file = Path(recipe.workspace).resolve() / ".cache" / "eval_base" / f"{base_sha256(recipe, inp.base_dir)}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key in cache:
        log(f"base: cached results ({cache_file.name})")
    else:
        log("base: evaluating (cached afterwards by the base's sha256)")
        ev = eval_hf(engine, inp, recipe, drift_tokens=0)
        cache[key] = {"golden_answers": [c.answer for c in ev.golden.cases], "redteam_answers": ev.redteam_answers,
                      "overrefusal_answers": ev.overrefusal_answers, "refusal_rate": ev.refusal_rate, "ppl": ev.ppl,
                      "settings": settings}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    hit = cache[key]
    return BaseEval(score_golden(inp.golden, hit["golden_answers"], count_tokens(inp.tokenizer)),
                    hit["redteam_answers"], hit["refusal_rate"], hit["overrefusal_answers"], hit["ppl"])
