"""The pieces of a training run that the stage and the throughput benchmark share, so the benchmark measures
exactly what `accelerate launch train RECIPE` runs: model loading (dtype, attention, Liger, 4-bit), the peft
config, the SFTConfig, and what is done to trl's trainer once it exists (the fixed token budget around its
collator, the compiled decoder layers)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def load_base_model(base_dir: Path, section, plan, device_index: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, plan.dtype)
    if plan.attention == "varlen":
        from .attention import register_varlen

        register_varlen()
    kwargs = {"dtype": dtype, "attn_implementation": plan.attention}
    if plan.device == "cuda":
        kwargs["device_map"] = {"": device_index}
    if section.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if plan.liger_kernels:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # trl computes the loss with its own chunked LM head, so Liger's cross-entropy kernels stay off
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    return model


def lora_config(section):
    from peft import LoraConfig

    return LoraConfig(
        r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout, target_modules=section.target_modules,
        use_dora=section.method == "dora", task_type="CAUSAL_LM",
    )


def sft_config(section, plan, output_dir: Path, seed: int, is_main: bool, eos_token: str | None):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        seed=seed, data_seed=seed,
        max_steps=section.max_steps or -1, num_train_epochs=section.epochs,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.eval_batch_size or section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        learning_rate=section.learning_rate, lr_scheduler_type=section.lr_scheduler,
        # transformers 5 has no warmup_ratio: a float below 1 in warmup_steps is read as a share of the steps
        warmup_steps=section.warmup_ratio, weight_decay=section.weight_decay, max_grad_norm=section.max_grad_norm,
        bf16=plan.dtype == "bfloat16", fp16=plan.dtype == "float16", use_cpu=plan.device == "cpu",
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        torch_compile=False,  # the decoder layers are compiled one by one (prepare_trainer), not the whole model
        max_length=section.max_seq_len, assistant_only_loss=section.assistant_only_loss,
        # best-fit-decreasing packing into rows of max_seq_len, flattened without padding (position_ids mark
        # where each conversation starts, so attention never crosses one)
        packing=plan.packing, packing_strategy="bfd", padding_free=plan.packing,
        eos_token=eos_token,
        logging_steps=section.logging_steps, logging_first_step=True, disable_tqdm=not is_main,
        # checkpoints go to a staging directory and are promoted atomically by a callback; nothing is rotated
        # by the Trainer, so an old complete checkpoint is never deleted before a new one is complete
        save_strategy="steps", save_steps=section.save_steps, save_total_limit=None,
        # evaluation needs the loss only: keeping every batch's logits would hold vocab x tokens floats in memory
        eval_strategy="no", prediction_loss_only=True, report_to=[], dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def prepare_trainer(trainer, section, plan) -> None:
    """After trl built the trainer (and peft the adapters): pad every packed batch to the token budget and compile
    the decoder layers, as the plan says. The collator is wrapped, not replaced: trl's padding-free collator
    still builds every batch (trl refuses a custom one with padding_free)."""
    if plan.token_budget:
        from .budget import TokenBudget, max_conversations_per_row

        pad_id = getattr(trainer.processing_class, "pad_token_id", None)
        trainer.data_collator = TokenBudget(
            trainer.data_collator, rows=section.batch_size, max_seq_len=section.max_seq_len,
            max_conversations_per_row=max_conversations_per_row(trainer.train_dataset, trainer.eval_dataset),
            pad_token_id=0 if pad_id is None else pad_id,
        )
    if plan.compile:
        from .compiling import compile_decoder_layers

        compile_decoder_layers(trainer.model, plan.compile_backend)


@contextmanager
def evaluation_mode(model, plan):
    """Score without gradients: through sdpa when training runs on flex attention, and with the layers eager
    when they are compiled for training.

    Flex attention's kernels are compiled for training rows; under no_grad, short rows take its decoding kernel,
    which failed to compile on an H200 (torch 2.11: NoValidChoicesError for a 4 x 120-token batch). Evaluation
    gains nothing from flex: sdpa gives the same values (packed rows keep their per-conversation mask, since trl
    calls the model with use_cache=False) and needs no compilation. varlen attention needs no compilation
    either and evaluates as it trains. Compiled layers would compile a graph of their own for gradient-free
    scoring of a few batches: they run eagerly instead, so training's graph stays the only one.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flex = plan.attention == "flex_attention"
    if flex:
        base.set_attn_implementation("sdpa")
    try:
        if plan.compile:
            with torch.compiler.set_stance("force_eager"):
                yield
        else:
            yield
    finally:
        if flex:
            base.set_attn_implementation(plan.attention)
