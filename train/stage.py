"""`accelerate launch train RECIPE`: LoRA / DoRA / QLoRA supervised fine-tuning of the pinned base on clean/.

Read top to bottom: check inputs -> load data, tokenizer + chat template, base model -> build the trl
SFTTrainer with a peft config -> score the base -> train (resuming from the newest complete checkpoint) ->
score the fine-tune -> the main process writes adapter/, metrics.json, loss.png and the manifest.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from recipes import Recipe
from workbench.stage_cli import stage_main
from workbench.workspace import STAGE_COMMANDS, StageError, Workspace, stage_output


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", "LoRA / QLoRA / DoRA fine-tuning of the recipe's base on the cleaned data", run, argv)


def run(recipe: Recipe, args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from .fast_path import check_machine

    check_machine(recipe.train)
    # cpu=True is what makes a CPU launch with several processes a gloo process group (MULTI_CPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    ws = Workspace(recipe)
    _check_clean_is_done(ws)
    if not args.force and ws.status("train") == "done":
        if state.is_main_process:
            print(f"train: {ws.stage_dir('train')} is up to date (use --force to re-run)")
        return 0
    from .checkpoints import CheckpointStore

    store = CheckpointStore(ws)
    if state.is_main_process:
        with stage_output(recipe, "train", force=True) as out:
            out.results.update(train(recipe, ws, store, out.dir, state))
        store.clear()  # the output is committed: the checkpoints have served their purpose
        print(f"train: wrote {out.final_dir}")
    else:
        train(recipe, ws, store, None, state)  # the other ranks train and write nothing
    return 0


def train(recipe: Recipe, ws: Workspace, store, out_dir: Path | None, state) -> dict:
    """Fine-tune and (main process, out_dir given) save the adapter and metrics. Returns the manifest results."""
    import datasets
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from trl import SFTTrainer

    from workbench.base import resolve_base

    from .build import evaluation_attention, load_base_model, lora_config, sft_config
    from .chat_template import resolve_chat_template
    from .checkpoints import PromoteCheckpoints
    from .fast_path import check_fast_path, plan_run
    from .perplexity import text_perplexity
    from .tracking import MetricsLogger, TokenCounter, finish_run, flatten_params, peak_memory_mib, plot_loss, start_run

    section = recipe.train
    is_main = state.is_main_process

    # --- setup: data -------------------------------------------------------------------------------------------
    clean_dir = ws.stage_dir("clean")
    clean_manifest = ws.manifest("clean") or {}
    datasets.disable_caching()  # never write cache files into clean/ (another stage's output)
    train_ds = _load_split(clean_dir, "train", "messages")
    eval_ds = _load_split(clean_dir, "eval", "messages")
    heldout = _load_split(clean_dir, "heldout_text", "text", required=False)

    # --- setup: base, tokenizer, chat template, how to run on this machine -------------------------------------
    with state.main_process_first():  # the main process provisions a missing base; the others then find it
        base_dir = resolve_base(recipe.base_model)
    model_config = AutoConfig.from_pretrained(base_dir)
    plan = plan_run(section, model_config)  # qlora without CUDA fails here, before any work
    if is_main:
        for note in check_fast_path(plan):
            print(f"train: note: {note}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = resolve_chat_template(section.chat_template, tokenizer, section.assistant_only_loss)
    end_of_turn = "<|im_end|>" if section.chat_template == "chatml" else None

    model = load_base_model(base_dir, section, plan, state.local_process_index)
    lora = lora_config(section)

    store.prepare(is_main)
    state.wait_for_everyone()
    resume_from = store.latest()

    # --- setup: tracking (main process) ------------------------------------------------------------------------
    fingerprints = (clean_manifest.get("results") or {}).get("fingerprints") or {}
    run_id = None
    if is_main:
        params = {
            **flatten_params("train", section.model_dump(mode="json")),
            **{k: str(v) for k, v in plan.as_params().items()},
            "base_model": recipe.base_model.label, "seed": str(recipe.seed), "world_size": str(state.num_processes),
            "train_records": str(len(train_ds)), "eval_records": str(len(eval_ds)),
        }
        run_id = start_run(recipe, store.read_run_id(), params, clean_dir, fingerprints)
        store.write_run_id(run_id)

    # --- setup: trainer ----------------------------------------------------------------------------------------
    config = sft_config(section, plan, store.staging, recipe.seed, is_main, end_of_turn)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=lora,
    )
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    logger = MetricsLogger(run_id, counter, plan.device, state.num_processes)
    trainer.add_callback(PromoteCheckpoints(store, section.keep_checkpoints))
    trainer.add_callback(logger)

    # --- run: score the base, train, score the fine-tune -------------------------------------------------------
    with trainer.model.disable_adapter(), evaluation_attention(trainer.model, plan):
        base_eval = trainer.evaluate(metric_key_prefix="base_eval")
        base_heldout = _heldout_ppl(trainer.model, tokenizer, heldout, section, is_main, text_perplexity)
    if is_main and resume_from is not None:
        print(f"train: resuming from {resume_from}")
    counter.reset()  # count training batches only, not the evaluation above
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trained = counter.state()
    with evaluation_attention(trainer.model, plan):
        final_eval = trainer.evaluate()
        heldout_ppl = _heldout_ppl(trainer.model, tokenizer, heldout, section, is_main, text_perplexity)
    ranks = _gather_ranks(state, trained)

    # --- save: adapter + tokenizer + template + generation config, metrics, plot, MLflow -----------------------
    peft_cfg = trainer.model.peft_config["default"]
    peft_cfg.base_model_name_or_path = recipe.base_model.label
    peft_cfg.revision = recipe.base_model.revision
    if isinstance(peft_cfg.target_modules, (set, frozenset)):
        peft_cfg.target_modules = sorted(peft_cfg.target_modules)  # 'all-linear' resolves to a set: keep files stable
    # every rank takes part (FSDP gathers the sharded adapter); only the main process writes
    adapter_dir = out_dir / "adapter" if is_main else store.staging / "adapter-unused"
    trainer.save_model(str(adapter_dir))
    state.wait_for_everyone()
    if not is_main:
        return {}
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle of the arguments; nothing reads it
    tokenizer.save_pretrained(str(adapter_dir))
    generation = GenerationConfig.from_pretrained(base_dir) if (Path(base_dir) / "generation_config.json").is_file() \
        else GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(str(adapter_dir))

    base_ppl, eval_ppl = _ppl(base_eval["base_eval_loss"]), _ppl(final_eval["eval_loss"])
    steps = int(trainer.state.global_step)
    train_loss = _last_train_loss(trainer.state.log_history, result.training_loss)
    metrics = {
        "method": section.method,
        "steps": steps,
        "train_loss": train_loss,
        "loss_curve": [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
                       for h in trainer.state.log_history if "loss" in h],
        "base_eval_loss": base_eval["base_eval_loss"], "base_eval_perplexity": base_ppl,
        "eval_loss": final_eval["eval_loss"], "eval_perplexity": eval_ppl,
        "base_heldout_perplexity": base_heldout, "heldout_perplexity": heldout_ppl,
        "tokens_per_s": _median(logger.tokens_per_s),
        "peak_memory_mib": peak_memory_mib(plan.device),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed_from_step": _step_of(resume_from),
        "world_size": state.num_processes,
        "ranks": ranks,
        "plan": plan.as_params(),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_safe))
    plot_loss(trainer.state.log_history, out_dir / "loss.png")
    finish_run(run_id, {
        "final_train_loss": train_loss, "base_eval_loss": base_eval["base_eval_loss"],
        "base_eval_perplexity": base_ppl, "eval_loss": final_eval["eval_loss"], "eval_perplexity": eval_ppl,
        "base_heldout_perplexity": base_heldout, "heldout_perplexity": heldout_ppl,
        "median_tokens_per_s": metrics["tokens_per_s"], "peak_memory_mib": metrics["peak_memory_mib"],
    }, [out_dir / "metrics.json", out_dir / "loss.png"])
    print(f"train: {steps} steps, loss {train_loss:.4f}; eval perplexity {base_ppl:.2f} (base) -> {eval_ppl:.2f}"
          + (f"; held-out perplexity {base_heldout:.2f} -> {heldout_ppl:.2f}" if heldout_ppl is not None else ""))
    return {
        "method": section.method, "steps": steps, "train_loss": train_loss,
        "eval_perplexity": eval_ppl, "base_eval_perplexity": base_ppl,
        "heldout_perplexity": heldout_ppl, "base_heldout_perplexity": base_heldout,
        "mlflow_run_id": run_id,
    }


# --- helpers ---------------------------------------------------------------------------------------------------


def _check_clean_is_done(ws: Workspace) -> None:
    ws.require("clean")
    if ws.status("clean") != "done":
        cmd = " ".join(["python"] + STAGE_COMMANDS["clean"] + ["RECIPE"])
        raise StageError(f"{ws.stage_dir('clean')}: input stage 'clean' is stale; re-run it first (`{cmd}`)")


def _load_split(clean_dir: Path, split: str, column: str, required: bool = True):
    from datasets import Dataset, load_from_disk

    path = clean_dir / split
    if not path.exists():
        if required:
            raise StageError(f"{path}: the clean stage output has no '{split}' dataset")
        return None
    try:
        ds = load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # a corrupt or foreign directory: say which
        raise StageError(f"{path}: not a datasets Arrow directory ({exc})") from None
    if not isinstance(ds, Dataset):
        raise StageError(f"{path}: expected one Dataset, found {type(ds).__name__}")
    if column not in ds.column_names:
        raise StageError(f"{path}: no '{column}' column (columns: {', '.join(ds.column_names)})")
    if required and len(ds) == 0:
        raise StageError(f"{path}: the '{split}' split is empty")
    ds = ds.select_columns([column])
    if column == "messages":
        _check_messages(ds, path)
    return ds


def _check_messages(ds, path: Path) -> None:
    roles = {"system", "user", "assistant"}
    for i, record in enumerate(ds["messages"]):
        if not record:
            raise StageError(f"{path}: record {i}: 'messages' is empty")
        for j, msg in enumerate(record):
            if msg.get("role") not in roles or not isinstance(msg.get("content"), str):
                raise StageError(f"{path}: record {i}, message {j}: needs role in {sorted(roles)} and string content, "
                                 f"got {msg!r:.120}")
        if not any(m["role"] == "assistant" for m in record):
            raise StageError(f"{path}: record {i}: no assistant turn to learn from")


def _heldout_ppl(model, tokenizer, heldout, section, is_main: bool, score) -> float | None:
    """Held-out domain perplexity, computed by the main process only (the others wait at the next barrier)."""
    if heldout is None or section.heldout_max_records == 0 or len(heldout) == 0 or not is_main:
        return None
    texts = [t for t in heldout.select(range(min(len(heldout), section.heldout_max_records)))["text"] if t]
    return score(model, tokenizer, texts, section.max_seq_len)


def _gather_ranks(state, trained: dict) -> list[dict]:
    """Every rank's training token counts (this session), so the output shows that each process trained."""
    import torch.distributed as dist

    mine = {"rank": state.process_index, **trained}
    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        everyone = [None] * state.num_processes
        dist.all_gather_object(everyone, mine)
        return everyone
    return [mine]


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _last_train_loss(log_history: list[dict], fallback: float) -> float:
    losses = [h["loss"] for h in log_history if "loss" in h]
    return float(losses[-1]) if losses else float(fallback)


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else None


def _json_safe(value):
    if isinstance(value, Path):
        return str(value)
    return repr(value)
