"""The fast path's packed, padding-free rows must train the model on exactly what padded batches do.

Packing puts several conversations in one row with no attention mask. With sdpa, eager or flex attention only
position_ids tell the attention where a conversation starts: transformers derives a per-conversation mask from
them when the model is called without a KV cache (use_cache=False, which trl passes and which transformers'
Trainer sets in the model config); with varlen attention trl's cu_seq_lens do. If an attention implementation
ignored them, every token would silently attend to the conversations packed before it and the loss would differ.
These tests compare the loss (and gradients) of one batch, padded vs packed by trl's padding-free collator,
through the model loading the train stage uses (train/build.py).
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


def _cpu_plan(attention: str):
    from train.fast_path import RunPlan

    return RunPlan(device="cpu", dtype="float32", packing=True, attention=attention, gradient_checkpointing=False,
                   liger_kernels=False, compile=False)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen"])
def test_packed_rows_give_the_padded_loss_on_cpu(tmp_path, attention):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.build import load_base_model

    _tiny_llama(tmp_path, torch.float32)
    model = load_base_model(tmp_path, TrainSection(method="lora"), _cpu_plan(attention)).eval()
    examples = [{"input_ids": s} for s in _sequences()]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert "attention_mask" not in row and row["input_ids"].shape[0] == 1
    # both batches count the same loss tokens: each conversation's first token is never a target
    assert int((padded["labels"][:, 1:] != -100).sum()) == int((row["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        model.set_attn_implementation("sdpa")  # the reference: padded rows with their padding mask
        reference = float(model(**padded, use_cache=False).loss)
        model.set_attn_implementation(attention)
        packed = float(model(**row, use_cache=False).loss)
    assert packed == pytest.approx(reference, rel=1e-5)

    # and the check has teeth: the same packed row without its conversation boundaries (varlen: cu_seq_lens of
    # one conversation; the others: no position_ids, or a KV cache, which skips the per-conversation mask) lets
    # attention cross conversations, which changes the loss
    with torch.no_grad():
        if attention == "varlen":
            whole = torch.tensor([0, row["input_ids"].shape[1]], dtype=torch.int32)
            crossing = [model(input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"],
                              cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=int(whole[1]),
                              max_length_k=int(whole[1]), use_cache=False).loss]
        else:
            crossing = [model(input_ids=row["input_ids"], labels=row["labels"], use_cache=False).loss,
                        model(input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"],
                              use_cache=True).loss]
    assert all(abs(float(loss) - reference) > 1e-3 for loss in crossing)


def test_varlen_training_gradients_match_the_padded_batch(tmp_path):
    """Backward through torch's varlen op (its CPU reference kernel here) gives the padded batch's gradients:
    the packed row trains every adapter exactly as the padded batch does."""
    import torch
    from peft import get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.build import load_base_model, lora_config

    _tiny_llama(tmp_path, torch.float32)
    section = TrainSection(method="lora", dropout=0.0)
    model = get_peft_model(load_base_model(tmp_path, section, _cpu_plan("varlen")), lora_config(section))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, where A gets no gradient: make both matter
            torch.nn.init.normal_(p, std=0.02)
    examples = [{"input_ids": s} for s in _sequences()]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)

    def gradients(attention, batch):
        model.zero_grad()
        model.base_model.model.set_attn_implementation(attention)
        model(**batch, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference, packed = gradients("sdpa", padded), gradients("varlen", row)
    assert reference.keys() == packed.keys() and len(packed) == 2 * 2 * 7  # A and B, 2 layers, 7 projections
    for name in reference:
        assert torch.allclose(packed[name], reference[name], rtol=1e-4, atol=1e-7), name


def test_the_plain_trainer_keeps_packed_conversations_apart(tmp_path):
    """What the plain baselines in bench/ run: transformers' Trainer + PEFT with a hand-written packed collator.
    Trainer() sets the model config's use_cache to TrainingArguments.use_cache (False), so the model derives the
    per-conversation mask from position_ids: its packed loss is the padded loss. Only a model config with
    use_cache=True (which no Trainer leaves) lets the row cross conversations."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    _tiny_llama(tmp_path / "base", torch.float32)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    assert model.config.use_cache is True  # what from_pretrained leaves
    seqs = [torch.tensor(s) for s in _sequences()]
    row = {"input_ids": torch.cat(seqs)[None], "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}
    row["labels"] = row["input_ids"].clone()
    row["labels"][row["position_ids"] == 0] = -100  # no loss across a conversation boundary (as bench/ does)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, max_steps=1,
                             use_cpu=True, report_to=[], save_strategy="no", remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=[row], data_collator=lambda b: b[0])
    assert model.config.use_cache is False

    length = max(map(len, seqs))
    padded = {"input_ids": torch.zeros(len(seqs), length, dtype=torch.long),
              "attention_mask": torch.zeros(len(seqs), length, dtype=torch.long),
              "labels": torch.full((len(seqs), length), -100)}
    for i, s in enumerate(seqs):
        padded["input_ids"][i, :len(s)], padded["attention_mask"][i, :len(s)] = s, 1
        padded["labels"][i, 1:len(s)] = s[1:]
    model.eval()
    with torch.no_grad():
        reference = float(model(**padded).loss)
        packed = float(trainer.compute_loss(model, dict(row)))
        model.config.use_cache = True
        crossing = float(trainer.compute_loss(model, dict(row)))
    assert packed == pytest.approx(reference, rel=1e-5)
    assert abs(crossing - reference) > 1e-3


@pytest.mark.gpu
def test_gpu_fast_path_plan_packs_without_crossing_and_trains(tmp_path):
    """On CUDA the `auto` plan packs, attends through torch's varlen attention (flash/flex without it) and
    compiles the decoder layers over a fixed token budget. A packed row through that attention gives the loss of
    the padded batch (through sdpa), in evaluation and in training mode; 30 optimizer steps through the stage's
    SFTConfig, collator wrapper and compiled layers lower the loss and compile only in the first step;
    evaluation afterwards works."""
    import torch
    from datasets import Dataset
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from train.attention import torch_has_varlen
    from train.build import evaluation_mode, load_base_model, lora_config, prepare_trainer, sft_config
    from train.compiling import CompileLog
    from train.fast_path import plan_run

    cfg = _tiny_llama(tmp_path / "base", torch.bfloat16)
    section = TrainSection(method="lora", r=8, alpha=16, dropout=0.0, learning_rate=3e-3, warmup_ratio=0.0,
                           lr_scheduler="constant", max_steps=30, batch_size=4, max_seq_len=256,
                           assistant_only_loss=False, logging_steps=1, save_steps=10**6)
    plan = plan_run(section, cfg)
    assert plan.device == "cuda" and plan.packing and plan.dtype == "bfloat16"
    if torch_has_varlen() and torch.cuda.get_device_capability() >= (8, 0):
        assert plan.attention == "varlen" and plan.compile and plan.token_budget == 4 * 256
        assert not plan.liger_kernels  # inductor fuses what Liger would
    else:
        assert plan.attention in ("flash_attention_2", "flex_attention")

    model = load_base_model(tmp_path / "base", section, plan)
    examples = [{"input_ids": s} for s in _sequences()]
    padded = {k: v.cuda() for k, v in DataCollatorForLanguageModeling(pad_token_id=0)(examples).items()}
    packed = {k: v.cuda() if torch.is_tensor(v) else v
              for k, v in DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples).items()}
    model.eval()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        reference = float(model(**padded, use_cache=False).loss)
        model.set_attn_implementation(plan.attention)
        with evaluation_mode(model, plan):
            packed_eval = float(model(**packed, use_cache=False).loss)
    assert model.config._attn_implementation == plan.attention  # restored after evaluation
    model.train()  # the training kernels, as trl runs them (dropout is 0: the forward is deterministic)
    packed_train = float(model(**packed, use_cache=False).loss)
    assert packed_eval == pytest.approx(reference, rel=2e-2)  # bf16
    assert packed_train == pytest.approx(reference, rel=2e-2)

    # counting sequences are learnable (on CPU this setup goes from 6.3 to 4.8 in 30 steps): gradients must reach
    # the adapters through the compiled layers and the packed attention
    pattern = [list(range(10 + i, 60 + i + i % 7)) * 2 for i in range(64)]  # varied lengths: varied packing
    args = sft_config(section, plan, tmp_path / "out", seed=0, is_main=True, eos_token=None)
    args.save_strategy = "no"
    data = Dataset.from_dict({"input_ids": pattern})
    trainer = SFTTrainer(model=load_base_model(tmp_path / "base", section, plan), args=args, train_dataset=data,
                         eval_dataset=data.select(range(8)), peft_config=lora_config(section),
                         processing_class=_id_tokenizer(cfg.vocab_size))
    prepare_trainer(trainer, section, plan)
    frames_after_first = []
    log = CompileLog()
    log.start()

    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                frames_after_first.append(log.frames())

    trainer.add_callback(FirstStep())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 20 and max(losses[-5:]) < 0.85 * losses[0], losses
    if plan.compile:
        assert frames_after_first[0] >= 1 and log.frames() == frames_after_first[0], log.summary()
    with evaluation_mode(trainer.model, plan):
        assert trainer.evaluate()["eval_loss"] < losses[0]


@pytest.mark.gpu
def test_gpu_varlen_kernel_matches_sdpa_per_conversation_with_padded_cu_seq_lens():
    """torch's varlen flash kernels as the fixed token budget calls them: bf16, GQA (native where torch has
    enable_gqa, else repeated K/V), zero-length conversations at the end of cu_seq_lens, a constant max length
    above every conversation's. Output and gradients match sdpa run on each conversation alone (fp32)."""
    import torch
    import torch.nn.functional as F

    from train.attention import register_varlen, varlen_attention

    register_varlen()
    torch.manual_seed(0)
    lens = [700, 1, 129, 2048 - 830]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()] + [2048] * 4, dtype=torch.int32, device="cuda")
    total, hq, hkv, dim = 2048, 32, 8, 64
    q, k, v = (torch.randn(1, h, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    out, _ = varlen_attention(None, q, k, v, None, scaling=dim ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                              max_length_q=2048, max_length_k=2048)
    grad = torch.randn_like(out)
    out.backward(grad)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            ref.append(F.scaled_dot_product_attention(q2[:, :, s:e], k2[:, :, s:e], v2[:, :, s:e], is_causal=True,
                                                      enable_gqa=True).transpose(1, 2))
    ref = torch.cat(ref, dim=1)
    ref.backward(grad.float())
    assert out.shape == (1, total, hq, dim)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
