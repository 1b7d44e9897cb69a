"""LoRA fine-tuning throughput: plain Hugging Face baselines vs the workbench's own train path, same shape and data.

    python bench/train_throughput.py            # GPU: Llama-3.2-1B shape, random init, bf16
    python bench/train_throughput.py --tiny     # CPU smoke run of every config on a 2-layer model
    python bench/train_throughput.py --configs padded,workbench

Each config runs in its own process (clean memory statistics, no state carried between configs) and prints one
JSON line; the parent prints a table with tokens/s (real, non-pad tokens), peak memory, MFU and the ratios to the
best baseline. The model is a random-init Llama with the 1B shape (speed does not depend on the weight values),
LoRA r=16 on every linear projection, variable-length chat-like sequences (log-normal, median ~300 tokens),
~13k real tokens per step (32 sequences); `--n-seq 128` gives 4x the tokens per step.

Baselines (transformers Trainer + PEFT, what a plain script runs):
    padded            padded batches, sdpa, gradient checkpointing
    packed_flex       one packed padding-free row, flex attention, checkpointing
    packed_liger      packed_flex + Liger kernels
    packed_liger_nockpt  the same without gradient checkpointing
Workbench (train/build.py: the same model loading, peft config and SFTConfig as `accelerate launch train`):
    workbench         the default `auto` plan on this machine (packing, attention, Liger, checkpointing)
    workbench_compile the same with train.compile: true

GPU figures are only meaningful on the card named in the output; rerun the baselines in the same session.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINES = ("padded", "packed_flex", "packed_liger", "packed_liger_nockpt")
WORKBENCH = ("workbench", "workbench_compile")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def shape(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=2048,
                           tie_word_embeddings=True)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=True)


def sequences(n: int, tiny: bool, vocab: int, max_len: int) -> list[list[int]]:
    """n random token sequences with log-normal chat-like lengths (the same for every config)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(60 if tiny else 300))
    lens = [int(min(max(v, 8 if tiny else 32), max_len)) for v in x]
    return [torch.randint(0, vocab, (n_,), generator=torch.Generator().manual_seed(i)).tolist()
            for i, n_ in enumerate(lens)]


class StepTimer:
    """Wall time of every optimizer step (synchronised on CUDA)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer._sync()
                timer._start = time.perf_counter()

            def on_step_end(self, *a, **k):
                timer._sync()
                timer.times.append(time.perf_counter() - timer._start)
                # progress on stderr: a config stopped by --timeout still shows how far it got and how fast
                print(f"step {len(timer.times)}: {timer.times[-1]:.3f} s", file=sys.stderr, flush=True)

        self.callback = _CB()
        self.times: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def worker(config: str, tiny: bool, n_seq: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    cfg = shape(tiny)
    max_len = 256 if tiny else 2048
    steps, warm = (4, 1) if tiny else (12, 3)
    seqs = sequences(n_seq * (steps + warm), tiny, cfg.vocab_size, max_len)
    tokens_per_step = sum(map(len, seqs)) / (steps + warm)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if config in BASELINES:
        times, n_params = run_baseline(config, cfg, seqs, n_seq, steps + warm, cuda)
    else:
        times, n_params = run_workbench(config, cfg, seqs, n_seq, steps + warm, max_len, cuda)
    steady = times[warm:]
    step = statistics.median(steady)
    tps = tokens_per_step / step
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    # LoRA: forward 2N + backward through activations 2N FLOPs per token (frozen weights get no gradient)
    mfu = 4 * n_params * tps / peak if peak else None
    return {"config": config, "gpu": gpu, "n_seq": n_seq, "params": n_params, "tokens_per_step": round(tokens_per_step),
            "median_step_s": round(step, 4), "tokens_per_s": round(tps, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "mfu": round(mfu, 3) if mfu else None, "steps_s": [round(t, 3) for t in times]}


def run_baseline(config: str, cfg, seqs, n_seq: int, steps: int, cuda: bool):
    """The plain-HF script: Trainer + PEFT with a hand-written collator (padded or one packed row)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg._attn_implementation = "flex_attention" if "flex" in config or "liger" in config else "sdpa"
    if not cuda and cfg._attn_implementation == "flex_attention":
        cfg._attn_implementation = "sdpa"  # flex attention needs a GPU to be fast; CPU smoke runs use sdpa
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    if "liger" in config and cuda:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules="all-linear"))
    tensors = [torch.tensor(s) for s in seqs]
    packed = config.startswith("packed")

    class Rows(Dataset):
        def __len__(self):
            return steps if packed else len(tensors)

        def __getitem__(self, i):
            return tensors[i * n_seq:(i + 1) * n_seq] if packed else tensors[i]

    def collate_padded(batch):
        length = max(len(b) for b in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        att = torch.zeros_like(ids)
        lab = torch.full_like(ids, -100)
        for i, b in enumerate(batch):
            ids[i, :len(b)], att[i, :len(b)], lab[i, :len(b)] = b, 1, b
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    def collate_packed(batch):
        row = batch[0]
        ids = torch.cat(row)[None]
        pos = torch.cat([torch.arange(len(b)) for b in row])[None]
        lab = ids.clone()
        starts = torch.cumsum(torch.tensor([0] + [len(b) for b in row[:-1]]), 0)
        lab[0, starts[1:]] = -100  # no loss across a sequence boundary
        return {"input_ids": ids, "position_ids": pos, "labels": lab}

    timer = StepTimer()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{config}-"), per_device_train_batch_size=1 if packed else n_seq,
        max_steps=steps, learning_rate=1e-4, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=not config.endswith("nockpt"), gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1000, save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate_packed if packed else collate_padded,
            callbacks=[timer.callback]).train()
    return timer.times, n_params


def run_workbench(config: str, cfg, seqs, n_seq: int, steps: int, max_len: int, cuda: bool):
    """The stage's own path: plan_run -> load_base_model -> lora_config -> sft_config -> SFTTrainer."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import SFTTrainer

    from recipes.sections.train import TrainSection
    from train.build import load_base_model, lora_config, sft_config
    from train.fast_path import plan_run

    tokens_per_step = sum(map(len, seqs[:n_seq]))
    # one packed row per step holding this step's share of tokens: the same tokens per step as the baselines
    section = TrainSection(
        method="lora", r=16, alpha=32, dropout=0.0, learning_rate=1e-4, warmup_ratio=0.0, lr_scheduler="constant",
        max_steps=steps, batch_size=1 if cuda else n_seq, max_seq_len=max(max_len, tokens_per_step) if cuda else max_len,
        assistant_only_loss=False, logging_steps=1000, save_steps=10**6, compile=config == "workbench_compile",
    )
    plan = plan_run(section, cfg)
    base_dir = Path(tempfile.mkdtemp(prefix="bench-base-"))
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # random init of 1.2B parameters on the CPU alone takes a minute
        LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32).save_pretrained(base_dir)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_base_model(base_dir, section, plan)
    n_params = sum(p.numel() for p in model.parameters())
    args = sft_config(section, plan, Path(tempfile.mkdtemp(prefix="bench-wb-")), 0, True, None)
    args.disable_tqdm = True
    args.shuffle_dataset = False
    data = Dataset.from_dict({"input_ids": seqs})
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora_config(section),
                         processing_class=_stub_tokenizer(cfg.vocab_size), callbacks=[timer.callback])
    print(json.dumps({"plan": plan.as_params()}), file=sys.stderr)
    trainer.train()
    return timer.times, n_params


def _stub_tokenizer(vocab: int):
    """A word-level tokenizer over the random ids: trl wants a tokenizer for padding even with token-id datasets."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model, a few steps: a CPU smoke run")
    parser.add_argument("--configs", default=",".join(BASELINES + WORKBENCH))
    parser.add_argument("--n-seq", type=int, default=None, help="sequences per step (default 32; tiny: 8)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each config's process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_seq = args.n_seq or (8 if args.tiny else 32)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.tiny, n_seq)), flush=True)
        return 0

    results = []
    for config in args.configs.split(","):
        if config not in BASELINES + WORKBENCH:
            parser.error(f"unknown config {config!r}; choose from {', '.join(BASELINES + WORKBENCH)}")
        cmd = [sys.executable, __file__, "--worker", config, "--n-seq", str(n_seq)] + (["--tiny"] if args.tiny else [])
        # the repository first, then whatever the caller put on the path
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ, PYTHONPATH=path))
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-1500:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            print(f"{config}: no result within {args.timeout:.0f} s\n{tail}", file=sys.stderr, flush=True)
            results.append({"config": config, "error": "timeout"})
            continue
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{config}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
            results.append({"config": config, "error": proc.returncode})
            continue
        res = json.loads(line[len("RESULT "):])
        results.append(res)
        print(json.dumps(res), flush=True)

    ok = [r for r in results if "tokens_per_s" in r]
    base = [r for r in ok if r["config"] in BASELINES]
    best = max(base, key=lambda r: r["tokens_per_s"]) if base else None
    print(f"\n{'config':22} {'tok/s':>10} {'peak GiB':>9} {'MFU':>6} {'vs best baseline':>17}")
    for r in ok:
        ratio = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else "-"
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['config']:22} {r['tokens_per_s']:>10.0f} {peak:>9} {mfu:>6} {ratio:>17}")
    if best:
        print(f"(best baseline: {best['config']}; device: {best['gpu']}; {best['tokens_per_step']} real tokens/step)")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
