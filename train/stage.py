"""`accelerate launch train RECIPE`: LoRA / DoRA / QLoRA supervised fine-tuning of the pinned base on clean/.

Read top to bottom: setup (data, tokenizer + chat template, how to run on this machine, base model, MLflow run,
trl's SFTTrainer with a peft config) -> fit (train resuming from the newest complete checkpoint, score the
fine-tune and the base) -> save (the main process writes adapter/, metrics.json, loss.png, MLflow and the manifest).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes import Recipe
from workbench.workspace import Workspace, stage_output

# what the final MLflow metrics are called where a per-step metric already has the results' name
FINAL_METRIC_NAMES = {"train_loss": "final_train_loss", "tokens_per_s": "median_tokens_per_s"}


def run(recipe: Recipe, args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from .checkpoints import CheckpointStore
    from .fast_path import check_machine

    check_machine(recipe.train)
    # cpu=True is what makes a CPU launch with several processes a gloo process group (MULTI_CPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    ws = Workspace(recipe)
    ws.check_inputs("train")  # every rank, before any work: the other ranks open no stage output
    if not args.force and ws.status("train") == "done":
        if state.is_main_process:
            print(f"train: {ws.stage_dir('train')} is up to date (use --force to re-run)")
        return 0
    store = CheckpointStore(ws)
    if not state.is_main_process:
        session = setup(recipe, ws, store, state)
        save(session, fit(session), out_dir=None)  # the other ranks train and write nothing
        return 0
    with stage_output(recipe, "train", force=True) as out:
        session = setup(recipe, ws, store, state)
        out.results.update(save(session, fit(session), out.dir))
    store.clear()  # the output is committed: the checkpoints have served their purpose
    print(f"train: wrote {out.final_dir}")
    return 0


@dataclass
class Session:
    """Everything setup() made that fit() and save() use."""

    recipe: Recipe
    state: Any  # accelerate.PartialState
    store: Any  # checkpoints.CheckpointStore
    base_dir: Path
    plan: Any  # fast_path.RunPlan
    tokenizer: Any
    trainer: Any  # trl.SFTTrainer
    counter: Any  # tracking.TokenCounter
    logger: Any  # tracking.MetricsLogger
    heldout: Any  # datasets.Dataset of held-out text, or None
    run_id: str | None
    resume_from: Path | None


def setup(recipe: Recipe, ws: Workspace, store, state) -> Session:
    import datasets
    from transformers import AutoConfig, AutoTokenizer
    from trl import SFTTrainer

    from workbench.base import resolve_base
    from workbench.chat import CHATML_END, resolve_chat_template

    from .build import load_base_model, lora_config, prepare_trainer, sft_config
    from .checkpoints import PromoteCheckpoints
    from .data import load_split
    from .fast_path import check_fast_path, plan_run
    from .tracking import MetricsLogger, TokenCounter, start_run

    section, is_main = recipe.train, state.is_main_process
    clean_dir = ws.stage_dir("clean")
    datasets.disable_caching()  # never write cache files into clean/ (another stage's output)
    train_ds, eval_ds = load_split(clean_dir, "train", "messages"), load_split(clean_dir, "eval", "messages")
    heldout = load_split(clean_dir, "heldout_text", "text", required=False)

    with state.main_process_first():  # the main process provisions a missing base; the others then find it
        base_dir = resolve_base(recipe.base_model)
    plan = plan_run(section, AutoConfig.from_pretrained(base_dir))  # qlora without CUDA fails here
    for note in check_fast_path(plan) if is_main else ():
        print(f"train: note: {note}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = resolve_chat_template(section.chat_template, tokenizer, section.assistant_only_loss)
    model = load_base_model(base_dir, section, plan, state.local_process_index)

    store.prepare(is_main)
    state.wait_for_everyone()
    run_id = None
    if is_main:
        fingerprints = ((ws.manifest("clean") or {}).get("results") or {}).get("fingerprints") or {}
        run_id = start_run(recipe, store.read_run_id(), _run_params(recipe, plan, state, train_ds, eval_ds),
                           clean_dir, fingerprints)
        store.write_run_id(run_id)

    end_of_turn = CHATML_END if section.chat_template == "chatml" else None
    trainer = SFTTrainer(
        model=model, args=sft_config(section, plan, store.staging, recipe.seed, is_main, end_of_turn),
        train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer, peft_config=lora_config(section),
    )
    counter = TokenCounter(trainer.data_collator)  # composition: the collator is wrapped, not subclassed
    trainer.data_collator = counter
    prepare_trainer(trainer, section, plan)  # the token budget pads outside the counter: padding is never counted
    logger = MetricsLogger(run_id, counter, plan.device, state.num_processes, compiled=plan.compile)
    trainer.add_callback(PromoteCheckpoints(store, section.keep_checkpoints))
    trainer.add_callback(logger)
    return Session(recipe, state, store, base_dir, plan, tokenizer, trainer, counter, logger, heldout, run_id,
                   store.latest())


def fit(s: Session) -> dict[str, Any]:
    """Train, then score the fine-tune and the base. Returns the results every output is made from.

    The base is scored after training, with the adapter disabled (training changes only the adapter): a
    Trainer.evaluate() before train() prepares the model for evaluation, and accelerate then never wraps it for
    data-parallel training, so every rank would train on its own shard without ever averaging gradients.
    """
    from .build import evaluation_mode
    from .tracking import peak_memory_mib

    trainer = s.trainer
    if s.state.is_main_process and s.resume_from is not None:
        print(f"train: resuming from {s.resume_from}")
    s.counter.reset()
    result = trainer.train(resume_from_checkpoint=str(s.resume_from) if s.resume_from else None)
    trained, peak = s.counter.state(), peak_memory_mib(s.plan.device)
    with evaluation_mode(trainer.model, s.plan):
        final_eval = trainer.evaluate()["eval_loss"]
        heldout = _heldout_perplexity(s)
        with trainer.model.disable_adapter():
            base_eval = trainer.evaluate(metric_key_prefix="base_eval")["base_eval_loss"]
            base_heldout = _heldout_perplexity(s)
    history = trainer.state.log_history
    return {
        "method": s.recipe.train.method, "steps": int(trainer.state.global_step),
        "train_loss": _last_train_loss(history, result.training_loss),
        "base_eval_loss": base_eval, "base_eval_perplexity": _perplexity(base_eval),
        "eval_loss": final_eval, "eval_perplexity": _perplexity(final_eval),
        "base_heldout_perplexity": base_heldout, "heldout_perplexity": heldout,
        "tokens_per_s": _median(s.logger.tokens_per_s), "peak_memory_mib": peak,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed_from_step": int(s.resume_from.name.rsplit("-", 1)[1]) if s.resume_from else None,
        "world_size": s.state.num_processes, "ranks": _gather_ranks(s.state, trained), **s.logger.timing(),
    }


def save(s: Session, results: dict[str, Any], out_dir: Path | None) -> dict:
    """Every rank takes part in saving the adapter (FSDP gathers it); the main process writes the outputs and
    returns the manifest results."""
    from .tracking import finish_run, plot_loss

    trainer, recipe = s.trainer, s.recipe
    peft_cfg = trainer.model.peft_config["default"]
    peft_cfg.base_model_name_or_path = recipe.base_model.label
    peft_cfg.revision = recipe.base_model.revision
    if isinstance(peft_cfg.target_modules, (set, frozenset)):
        peft_cfg.target_modules = sorted(peft_cfg.target_modules)  # 'all-linear' resolves to a set: keep files stable
    adapter_dir = out_dir / "adapter" if out_dir is not None else s.store.staging / "adapter-unused"
    trainer.save_model(str(adapter_dir))
    s.state.wait_for_everyone()
    if out_dir is None:
        return {}
    _save_tokenizer_and_generation(s, adapter_dir)
    history = trainer.state.log_history
    metrics = {**results, "plan": s.plan.as_params(),
               "loss_curve": [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
                              for h in history if "loss" in h]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_safe))
    plot_loss(history, out_dir / "loss.png")
    finish_run(s.run_id, {FINAL_METRIC_NAMES.get(k, k): v for k, v in results.items() if _is_number(v)},
               [out_dir / "metrics.json", out_dir / "loss.png"])
    r = results
    print(f"train: {r['steps']} steps, loss {r['train_loss']:.4f}; eval perplexity {r['base_eval_perplexity']:.2f} "
          f"(base) -> {r['eval_perplexity']:.2f}" + (f"; held-out perplexity {r['base_heldout_perplexity']:.2f} -> "
                                                      f"{r['heldout_perplexity']:.2f}" if r["heldout_perplexity"] else ""))
    keys = ("method", "steps", "train_loss", "eval_perplexity", "base_eval_perplexity", "heldout_perplexity",
            "base_heldout_perplexity")
    return {**{k: r[k] for k in keys}, "mlflow_run_id": s.run_id}


# --- helpers ---------------------------------------------------------------------------------------------------


def _run_params(recipe: Recipe, plan, state, train_ds, eval_ds) -> dict[str, str]:
    from .tracking import flatten_params

    return {
        **flatten_params("train", recipe.train.model_dump(mode="json")),
        **{k: str(v) for k, v in plan.as_params().items()},
        "base_model": recipe.base_model.label, "seed": str(recipe.seed), "world_size": str(state.num_processes),
        "train_records": str(len(train_ds)), "eval_records": str(len(eval_ds)),
    }


def _save_tokenizer_and_generation(s: Session, adapter_dir: Path) -> None:
    """The tokenizer with the training chat template, and a generation config that stops at its end of turn."""
    from transformers import GenerationConfig

    (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle of the arguments; nothing reads it
    s.tokenizer.save_pretrained(str(adapter_dir))
    has_own = (Path(s.base_dir) / "generation_config.json").is_file()
    generation = GenerationConfig.from_pretrained(s.base_dir) if has_own else GenerationConfig()
    generation.eos_token_id = s.tokenizer.eos_token_id
    generation.pad_token_id = s.tokenizer.pad_token_id
    generation.save_pretrained(str(adapter_dir))


def _heldout_perplexity(s: Session) -> float | None:
    """Held-out domain perplexity, computed by the main process only (the others wait at the next barrier)."""
    from .perplexity import text_perplexity

    section, heldout = s.recipe.train, s.heldout
    if heldout is None or section.heldout_max_records == 0 or len(heldout) == 0 or not s.state.is_main_process:
        return None
    texts = [t for t in heldout.select(range(min(len(heldout), section.heldout_max_records)))["text"] if t]
    return text_perplexity(s.trainer.model, s.tokenizer, texts, section.max_seq_len)


def _gather_ranks(state, trained: dict) -> list[dict]:
    """Every rank's training token counts (this session), so the output shows that each process trained."""
    import torch.distributed as dist

    mine = {"rank": state.process_index, **trained}
    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        everyone = [None] * state.num_processes
        dist.all_gather_object(everyone, mine)
        return everyone
    return [mine]


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _last_train_loss(log_history: list[dict], fallback: float) -> float:
    losses = [h["loss"] for h in log_history if "loss" in h]
    return float(losses[-1]) if losses else float(fallback)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_safe(value):
    return str(value) if isinstance(value, Path) else repr(value)
