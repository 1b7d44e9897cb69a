"""LoRA fine-tuning throughput: plain Hugging Face baselines vs the workbench's own train path, same shape and data.

    python bench/train_throughput.py                       # GPU: Llama-3.2-1B shape, random init, bf16
    python bench/train_throughput.py --tiny                # CPU smoke run of every config on a 2-layer model
    python bench/train_throughput.py --configs wb_compile_8k,packed_liger_x4 --deadline 300

Each config runs in its own process (clean memory statistics and compile caches, no state carried between
configs) and prints one JSON line; the parent prints a table with tokens/s of real (non-padding) tokens, the
first step apart from the median step, the compile seconds, peak memory, MFU and the ratios to the best
baseline (at any memory, and within 16 GiB), and writes everything to bench/results/train_throughput.json with
the card's name, the torch version and the date. The model is a random-init Llama with the 1B shape (speed does
not depend on the weight values), LoRA r=16 on every linear projection, dropout 0, variable-length chat-like
sequences (log-normal, median ~300 tokens) whose tokens come from 256 ids of the vocabulary, so that the loss has
something to learn: the first and last loss of every config are reported (a config that does not train shows).

Baselines (transformers Trainer + PEFT, what a plain script runs; 32 sequences = ~13.7k real tokens per step, x4:
128 sequences = ~52.9k):
    padded                  padded batches, sdpa, gradient checkpointing
    packed_flex             one packed padding-free row, flex attention, checkpointing
    packed_liger            packed_flex + Liger kernels
    packed_liger_nockpt     the same without gradient checkpointing
    packed_liger_x4, packed_liger_nockpt_x4   the same two with 4x the tokens per step
Workbench (train/build.py: the model loading, peft config, SFTConfig, collator wrapper and compiled layers of
`accelerate launch train`; rows of 2048 tokens, `batch_size` rows per step, padded to the fixed token budget):
    wb_eager_8k, wb_compile_8k     4 x 2048 tokens per step, eager / every decoder layer compiled
    wb_eager_16k, wb_compile_16k   8 x 2048 tokens per step
    wb_compile_8k_dropout          wb_compile_8k with LoRA dropout 0.05 (what the dropout copies cost)
    wb_qlora_8k                    QLoRA (nf4, double quantization) through the same path; saves the adapter
Attention, compile and checkpointing are otherwise what the plan chooses on the machine (`auto`), and each
result carries its plan. With --tiny on a CPU the workbench configs attend through varlen's CPU reference kernel
and compile with the aot_eager backend (inductor needs a C++ toolchain and minutes there); QLoRA needs CUDA.

GPU figures are only meaningful on the card named in the output; rerun the baselines in the same session.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "train_throughput.json"
BASELINES = {
    "padded": {"n_seq": 32, "packed": False, "flex": False, "liger": False, "ckpt": True},
    "packed_flex": {"n_seq": 32, "packed": True, "flex": True, "liger": False, "ckpt": True},
    "packed_liger": {"n_seq": 32, "packed": True, "flex": True, "liger": True, "ckpt": True},
    "packed_liger_nockpt": {"n_seq": 32, "packed": True, "flex": True, "liger": True, "ckpt": False},
    "packed_liger_x4": {"n_seq": 128, "packed": True, "flex": True, "liger": True, "ckpt": True},
    "packed_liger_nockpt_x4": {"n_seq": 128, "packed": True, "flex": True, "liger": True, "ckpt": False},
}
WORKBENCH = {
    "wb_eager_8k": {"rows": 4, "compile": False},
    "wb_compile_8k": {"rows": 4, "compile": True},
    "wb_eager_16k": {"rows": 8, "compile": False},
    "wb_compile_16k": {"rows": 8, "compile": True},
    "wb_compile_8k_dropout": {"rows": 4, "compile": True, "dropout": 0.05},
    "wb_qlora_8k": {"rows": 4, "compile": "auto", "method": "qlora"},
}
CONFIGS = {**BASELINES, **WORKBENCH}
# the GPU run, most important first (a --deadline drops the tail)
DEFAULT_CONFIGS = ("wb_compile_8k", "packed_liger_x4", "packed_liger_nockpt_x4", "wb_qlora_8k", "wb_eager_8k",
                   "wb_compile_16k", "wb_eager_16k")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
LEARNED_IDS = 256  # the data's tokens come from this many ids: a loss that falls shows the config trains
GIB_LIMIT = 16.0


def shape(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048,
                           tie_word_embeddings=True)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=True)


def sizes(tiny: bool) -> dict:
    if tiny:
        return {"max_len": 256, "steps": 4, "warm": 2, "median_len": 60, "min_len": 8, "n_seq_scale": 0.25}
    return {"max_len": 2048, "steps": 8, "warm": 2, "median_len": 300, "min_len": 32, "n_seq_scale": 1.0}


def sequences(n: int, tiny: bool, vocab: int) -> list[list[int]]:
    """n token sequences with log-normal chat-like lengths (the same for every config)."""
    import torch

    size = sizes(tiny)
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(size["median_len"]))
    lens = [int(min(max(v, size["min_len"]), size["max_len"])) for v in x]
    ids = torch.randperm(vocab, generator=g)[:LEARNED_IDS]
    return [ids[torch.randint(0, LEARNED_IDS, (n_,), generator=torch.Generator().manual_seed(i))].tolist()
            for i, n_ in enumerate(lens)]


def worker(config: str, tiny: bool, base_dir: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if config == "wb_qlora_8k" and not cuda:
        return {"config": config, "skipped": "QLoRA (bitsandbytes 4-bit) needs a CUDA GPU"}
    cfg = shape(tiny)
    size = sizes(tiny)
    steps = size["steps"] + size["warm"]
    if config in BASELINES:
        logger, extra = run_baseline(config, cfg, steps, tiny, cuda)
    else:
        logger, extra = run_workbench(config, cfg, steps, tiny, cuda, base_dir)
    return summarize(config, cfg, logger, size["warm"], cuda, extra)


def summarize(config: str, cfg, logger, warm: int, cuda: bool, extra: dict) -> dict:
    import statistics

    import torch
    from transformers import LlamaForCausalLM

    times, tokens = logger.step_seconds, logger.step_tokens
    steady_t, steady_n = times[warm:], tokens[warm:]
    tps = sum(steady_n) / sum(steady_t)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    # LoRA: forward 2N + backward through the activations 2N FLOPs per token (frozen weights get no gradient);
    # attention's own FLOPs are left out, so this understates long rows a little
    mfu = 4 * n_params * tps / peak_flops if peak_flops else None
    losses = [h["loss"] for h in logger.history if "loss" in h]
    return {
        "config": config, "gpu": gpu, "params": n_params, "steps": len(times), "warmup_steps": warm,
        "real_tokens_per_step": round(statistics.mean(steady_n)), "tokens_per_s": round(tps, 1),
        "first_step_s": round(times[0], 3), "median_step_s": round(statistics.median(steady_t), 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "mfu": round(mfu, 3) if mfu else None, "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None, "steps_s": [round(t, 3) for t in times], "step_tokens": tokens,
        **{k: v for k, v in logger.timing().items() if k.startswith("compile")}, **extra,
    }


def run_baseline(config: str, cfg, steps: int, tiny: bool, cuda: bool):
    """The plain-HF script: Trainer + PEFT with a hand-written collator (padded or one packed row)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from train.tracking import MetricsLogger, TokenCounter

    spec = BASELINES[config]
    n_seq = max(2, int(spec["n_seq"] * sizes(tiny)["n_seq_scale"]))
    tensors = [torch.tensor(s) for s in sequences(n_seq * steps, tiny, cfg.vocab_size)]
    torch.manual_seed(0)
    # flex attention needs a GPU to be fast; CPU smoke runs use sdpa
    cfg._attn_implementation = "flex_attention" if spec["flex"] and cuda else "sdpa"
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    if spec["liger"] and cuda:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules="all-linear"))
    packed = spec["packed"]

    class Rows(Dataset):
        def __len__(self):
            return steps if packed else len(tensors)

        def __getitem__(self, i):
            return tensors[i * n_seq:(i + 1) * n_seq] if packed else tensors[i]

    counter = TokenCounter(_collate_packed if packed else _collate_padded)
    logger = MetricsLogger(None, counter, "cuda" if cuda else "cpu", 1)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{config}-"), per_device_train_batch_size=1 if packed else n_seq,
        max_steps=steps, learning_rate=3e-3, lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=spec["ckpt"], gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True,
    )
    # Trainer() sets use_cache=False in the model config: packed rows keep their conversations apart
    Trainer(model=model, args=args, train_dataset=Rows(), data_collator=counter,
            callbacks=[logger, _progress(logger)]).train()
    return logger, {"n_seq": n_seq, "gradient_checkpointing": spec["ckpt"]}


def _collate_padded(batch):
    import torch

    length = max(len(b) for b in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, b in enumerate(batch):
        ids[i, :len(b)], att[i, :len(b)], lab[i, :len(b)] = b, 1, b
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def _collate_packed(batch):
    import torch

    row = batch[0]
    ids = torch.cat(row)[None]
    pos = torch.cat([torch.arange(len(b)) for b in row])[None]
    lab = ids.clone()
    lab[pos == 0] = -100  # no loss across a sequence boundary
    return {"input_ids": ids, "position_ids": pos, "labels": lab}


def run_workbench(config: str, cfg, steps: int, tiny: bool, cuda: bool, base_dir: Path):
    """The stage's own path: plan_run -> load_base_model -> SFTTrainer(lora_config, sft_config) -> TokenCounter ->
    prepare_trainer (token budget, compiled layers); the stage's MetricsLogger times the steps."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import SFTTrainer

    from recipes.sections.train import TrainSection
    from train.build import load_base_model, lora_config, prepare_trainer, sft_config
    from train.fast_path import plan_run
    from train.tracking import MetricsLogger, TokenCounter

    spec = WORKBENCH[config]
    size = sizes(tiny)
    budget = spec["rows"] * size["max_len"]
    # enough sequences for every step's rows (best-fit packing fills rows to ~97%)
    n_seqs = int(steps * budget * 1.15 / (size["median_len"] * math.exp(0.32)))
    section = TrainSection(
        method=spec.get("method", "lora"), r=16, alpha=32, dropout=spec.get("dropout", 0.0), learning_rate=3e-3,
        warmup_ratio=0.0, lr_scheduler="constant", max_steps=steps, batch_size=spec["rows"],
        max_seq_len=size["max_len"], assistant_only_loss=False, logging_steps=1, save_steps=10**6,
        packing=True, token_budget=True, compile=spec["compile"], **({} if cuda else {"attention": "varlen"}),
    )
    plan = plan_run(section, cfg)
    if not (base_dir / "config.json").is_file():  # the first workbench config writes the base, the others load it
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):  # random init of 1.2B parameters on a CPU takes a minute
            LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32).save_pretrained(base_dir)
        if cuda:
            torch.cuda.empty_cache()
    model = load_base_model(base_dir, section, plan)
    out_dir = Path(tempfile.mkdtemp(prefix="bench-wb-"))
    args = sft_config(section, plan, out_dir, 0, True, None)
    args.disable_tqdm = True
    args.save_strategy = "no"
    args.shuffle_dataset = False
    data = Dataset.from_dict({"input_ids": sequences(n_seqs, tiny, cfg.vocab_size)})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora_config(section),
                         processing_class=_stub_tokenizer(cfg.vocab_size))
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    prepare_trainer(trainer, section, plan)
    logger = MetricsLogger(None, counter, plan.device, 1, compiled=plan.compile)
    trainer.add_callback(logger)
    trainer.add_callback(_progress(logger))
    print(json.dumps({"plan": plan.as_params()}), file=sys.stderr, flush=True)
    trainer.train()
    extra = {"plan": plan.as_params(), "token_budget": plan.token_budget}
    if section.method == "qlora":
        trainer.save_model(str(out_dir / "adapter"))
        saved = out_dir / "adapter" / "adapter_model.safetensors"
        extra["adapter_saved"] = saved.is_file()
        extra["adapter_bytes"] = saved.stat().st_size if saved.is_file() else 0
    return logger, extra


def _progress(logger):
    """Per-step progress on stderr: a config stopped by its timeout still shows how far it got and how fast."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"step {len(logger.step_seconds)}: {logger.step_seconds[-1]:.3f} s, {logger.step_tokens[-1]} real "
                  "tokens", file=sys.stderr, flush=True)

    return Progress()


def _stub_tokenizer(vocab: int):
    """A word-level tokenizer over the ids: trl wants a tokenizer for padding even with token-id datasets."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


# --- the parent: one process per config, the table, the JSON -------------------------------------------------


def run_config(config: str, tiny: bool, timeout: float | None, base_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--base-dir", str(base_dir)] + (["--tiny"] if tiny else [])
    # the repository first, then whatever the caller put on the path
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    if tiny and not _cuda():
        env.setdefault("TRAIN_COMPILE_BACKEND", "aot_eager")
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr or b""
        tail = (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-1500:]
        print(f"{config}: no result within {timeout:.0f} s\n{tail}", file=sys.stderr, flush=True)
        return {"config": config, "error": f"timeout after {timeout:.0f} s", "stderr_tail": tail}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"{config}: failed (exit {proc.returncode})\n{proc.stderr[-2500:]}", file=sys.stderr, flush=True)
        return {"config": config, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2500:]}
    res = json.loads(line[len("RESULT "):])
    res["process_s"] = round(time.perf_counter() - started, 1)
    return res


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def ratios(results: list[dict]) -> dict:
    ok = [r for r in results if "tokens_per_s" in r]
    base = [r for r in ok if r["config"] in BASELINES]
    best = max(base, key=lambda r: r["tokens_per_s"], default=None)
    small = [r for r in base if r["peak_mem_gib"] is not None and r["peak_mem_gib"] <= GIB_LIMIT]
    best_small = max(small, key=lambda r: r["tokens_per_s"], default=None)
    for r in ok:
        r["vs_best_baseline"] = round(r["tokens_per_s"] / best["tokens_per_s"], 3) if best else None
        r["vs_best_baseline_16gib"] = round(r["tokens_per_s"] / best_small["tokens_per_s"], 3) if best_small else None
    return {"best_baseline": best and best["config"], "best_baseline_16gib": best_small and best_small["config"]}


def print_table(results: list[dict], best: dict) -> None:
    print(f"\n{'config':24} {'tok/s':>9} {'first s':>8} {'median s':>9} {'compile s':>9} {'peak GiB':>9} {'MFU':>6} "
          f"{'vs best':>8} {'vs <=16G':>8} {'loss':>13}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['config']:24} {r.get('skipped') or r.get('error')}")
            continue

        def fmt(value, spec):
            return "-" if value is None else format(value, spec)

        loss = f"{r['loss_first']:.2f}>{r['loss_last']:.2f}" if r["loss_first"] is not None else "-"
        print(f"{r['config']:24} {r['tokens_per_s']:>9.0f} {r['first_step_s']:>8.2f} {r['median_step_s']:>9.3f} "
              f"{fmt(r.get('compile_s'), '.1f'):>9} {fmt(r['peak_mem_gib'], '.1f'):>9} {fmt(r['mfu'], '.1%'):>6} "
              f"{fmt(r['vs_best_baseline'], '.2f'):>8} {fmt(r['vs_best_baseline_16gib'], '.2f'):>8} {loss:>13}")
    print(f"(best baseline: {best['best_baseline']}; within {GIB_LIMIT:.0f} GiB: {best['best_baseline_16gib']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model, a few steps: a CPU smoke run")
    parser.add_argument("--configs", default=None, help=f"comma-separated (default: {','.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each config's process")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole run: configs are not started, or are cut short, past it")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results (default: {DEFAULT_OUT.relative_to(REPO)} on a GPU, none with --tiny)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.tiny, args.base_dir)), flush=True)
        return 0

    configs = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS)
    for config in configs:
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}; choose from {', '.join(CONFIGS)}")
    end = time.perf_counter() + args.deadline if args.deadline else None
    results = []
    base_dir = Path(tempfile.mkdtemp(prefix="bench-base-"))  # one random-init base for every workbench config
    for config in configs:
        left = end - time.perf_counter() if end else None
        if left is not None and left < 20:
            results.append({"config": config, "error": "not started: the --deadline was reached"})
            continue
        timeout = min(filter(None, [args.timeout, left]), default=None)
        res = run_config(config, args.tiny, timeout, base_dir)
        results.append(res)
        print(json.dumps(res), flush=True)
    best = ratios(results)
    print_table(results, best)
    out = args.out or (None if args.tiny else DEFAULT_OUT)
    if out is not None:
        write_results(out, results, best, args.tiny)
    return 0 if all("tokens_per_s" in r or "skipped" in r for r in results) else 1


def write_results(path: Path, results: list[dict], best: dict, tiny: bool) -> None:
    import torch

    cuda = torch.cuda.is_available()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "date": now,
           "shape": "tiny 2-layer Llama (smoke run: figures meaningless)" if tiny else "Llama-3.2-1B (random init)",
           **best, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
