"""The fast path's packed, padding-free rows must train the model on exactly what padded batches do.

Packing puts several conversations in one row with no attention mask; only position_ids tell the attention where a
conversation starts. If an attention implementation ignored them, every token would silently attend to the
conversations packed before it and the loss would differ. These tests compare the per-token loss of one batch,
padded vs packed by trl's padding-free collator, through the model loading the train stage uses (train/build.py),
called as trl's trainer calls it (use_cache=False: transformers only derives the per-conversation mask from
position_ids when no KV cache is built, and a forward with the default use_cache=True silently crosses them).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from recipes.sections.train import TrainSection


def _tiny_llama(path: Path, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return cfg


def _sequences():
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (37, 5, 120, 64)]


def _padded_and_packed_loss(model, seqs):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    device = next(model.parameters()).device
    examples = [{"input_ids": s} for s in seqs]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    # both batches count the same loss tokens: each conversation's first token is never a target
    assert int((padded["labels"][:, 1:] != -100).sum()) == int((packed["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss_padded = model(**{k: v.to(device) for k, v in padded.items()}, use_cache=False).loss.float()
        loss_packed = model(**{k: v.to(device) for k, v in packed.items() if torch.is_tensor(v)},
                            use_cache=False).loss.float()
    return float(loss_padded), float(loss_packed)


def _id_tokenizer(vocab: int):
    """trl wants a tokenizer (for padding) even when the dataset is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_loss_on_cpu(tmp_path, attention):
    import torch

    from train.build import load_base_model
    from train.fast_path import RunPlan

    _tiny_llama(tmp_path, torch.float32)
    plan = RunPlan(device="cpu", dtype="float32", packing=True, attention=attention, gradient_checkpointing=False,
                   liger_kernels=False, compile=False)
    model = load_base_model(tmp_path, TrainSection(method="lora"), plan).eval()
    padded, packed = _padded_and_packed_loss(model, _sequences())
    assert packed == pytest.approx(padded, rel=1e-4)

    # and the check has teeth: the same packed row with its position_ids dropped, or with a KV cache built, lets
    # attention cross conversations, which changes the loss
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in _sequences()])
    with torch.no_grad():
        no_positions = float(model(input_ids=row["input_ids"], labels=row["labels"], use_cache=False).loss)
        with_cache = float(model(input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"],
                                 use_cache=True).loss)
    assert abs(no_positions - padded) > 1e-3 and abs(with_cache - padded) > 1e-3


@pytest.mark.gpu
def test_gpu_fast_path_plan_packs_without_crossing_and_trains(tmp_path):
    """On CUDA the `auto` plan packs, uses flash/flex attention and Liger when installed. A packed training row
    through that attention gives the loss of the padded batch (scored the way the stage evaluates), and a few
    optimizer steps through the stage's SFTConfig lower the loss; evaluation afterwards works."""
    import importlib.util

    import torch
    from datasets import Dataset
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.build import evaluation_attention, load_base_model, lora_config, sft_config
    from train.fast_path import plan_run

    cfg = _tiny_llama(tmp_path / "base", torch.bfloat16)
    section = TrainSection(method="lora", r=8, alpha=16, dropout=0.0, learning_rate=3e-3, warmup_ratio=0.0,
                           lr_scheduler="constant", max_steps=30, batch_size=4, max_seq_len=256,
                           assistant_only_loss=False, logging_steps=1, save_steps=10**6)
    plan = plan_run(section, cfg)
    assert plan.device == "cuda" and plan.packing and plan.dtype == "bfloat16"
    assert plan.attention in ("flash_attention_2", "flex_attention")
    assert plan.liger_kernels == (importlib.util.find_spec("liger_kernel") is not None)

    model = load_base_model(tmp_path / "base", section, plan)
    examples = [{"input_ids": s} for s in _sequences()]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    model.eval()
    with evaluation_attention(model, plan), torch.no_grad():
        reference = float(model(**{k: v.cuda() for k, v in padded.items()}, use_cache=False).loss)
        packed_eval = float(model(**{k: v.cuda() for k, v in packed.items() if torch.is_tensor(v)},
                                  use_cache=False).loss)
    assert model.config._attn_implementation == plan.attention  # restored after evaluation
    model.train()  # the training kernels, as trl runs them (dropout is 0: the forward is deterministic)
    packed_train = float(model(**{k: v.cuda() for k, v in packed.items() if torch.is_tensor(v)},
                                use_cache=False).loss)
    assert packed_eval == pytest.approx(reference, rel=2e-2)  # bf16
    assert packed_train == pytest.approx(reference, rel=2e-2)

    # counting sequences are learnable (on CPU this setup goes from 6.3 to 4.8 in 30 steps): gradients must reach
    # the adapters through the fused kernels and the packed attention
    pattern = [list(range(10 + i, 60 + i)) * 2 for i in range(64)]
    args = sft_config(section, plan, tmp_path / "out", seed=0, is_main=True, eos_token=None)
    args.save_strategy = "no"
    data = Dataset.from_dict({"input_ids": pattern})
    trainer = SFTTrainer(model=load_base_model(tmp_path / "base", section, plan), args=args, train_dataset=data,
                         eval_dataset=data.select(range(8)), peft_config=lora_config(section),
                         processing_class=_id_tokenizer(cfg.vocab_size))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 20 and max(losses[-5:]) < 0.85 * losses[0], losses
    with evaluation_attention(trainer.model, plan):
        assert trainer.evaluate()["eval_loss"] < losses[0]
