from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .common import StrictModel

Auto = Literal["auto"]


class TrainSection(StrictModel):
    """LoRA / QLoRA / DoRA supervised fine-tuning with trl's SFTTrainer. (Owned by train.)

    The `auto` settings pick the fast path for the machine: on a CUDA GPU bf16, packed padding-free batches,
    torch's varlen attention, compiled decoder layers over a fixed token budget per step, and no gradient
    checkpointing when activations fit; on CPU bfloat16 where the CPU has bfloat16 matrix units (else float32),
    padded batches, sdpa, no compile and no checkpointing (memory is plentiful, recompute is not).
    train/fast_path.py has the rules.
    """

    method: Literal["lora", "qlora", "dora"] = Field(
        "lora", description="qlora = 4-bit nf4 base with double quantization (needs a CUDA GPU); dora = LoRA with use_dora"
    )
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(
        0.05, ge=0.0, lt=1.0,
        description="LoRA dropout; above 0 every adapted layer keeps a dropped-out copy of its input for backward",
    )
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    learning_rate: float = Field(2e-4, gt=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="share of the steps spent warming the learning rate up")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(
        8, gt=0, description="sequences per device per micro-step (with packing: rows of max_seq_len tokens)"
    )
    grad_accum: int = Field(1, gt=0)
    eval_batch_size: int | None = Field(None, gt=0, description="default: batch_size")
    max_seq_len: int = Field(512, gt=0, description="longer conversations are truncated to this many tokens")
    save_steps: int = Field(50, gt=0, description="checkpoint every N steps (resume after a crash)")
    keep_checkpoints: int = Field(2, gt=0, description="how many of the newest checkpoints to keep")
    logging_steps: int = Field(5, gt=0)
    chat_template: Literal["base", "chatml"] | str = Field(
        "chatml", description="'base' keeps the base's template, 'chatml' ships one with generation markers, or a .jinja path"
    )
    assistant_only_loss: bool = Field(True, description="loss on assistant tokens only (needs {% generation %} markers)")
    heldout_max_records: int = Field(
        64, ge=0, description="held-out text records scored for base vs fine-tune perplexity (0 = skip)"
    )
    # Speed knobs; `auto` chooses per machine (see the class docstring).
    precision: Auto | Literal["float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on a CUDA GPU that has it and on a CPU with bfloat16 matrix units "
                            "(AMX or AVX512-BF16), float16 on older GPUs, float32 otherwise")
    packing: Auto | bool = Field("auto", description="pack conversations padding-free (best-fit decreasing)")
    attention: Auto | Literal["varlen", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="varlen = torch's variable-length flash attention over packed rows (needs packing)"
    )
    gradient_checkpointing: Auto | bool = "auto"
    liger_kernels: Auto | bool = Field("auto", description="Liger Triton kernels (CUDA, when liger-kernel is installed)")
    compile: Auto | bool = Field("auto", description="torch.compile every decoder layer (auto: on a GPU with varlen)")
    token_budget: Auto | bool = Field(
        "auto", description="pad every packed micro-step to batch_size x max_seq_len tokens: one shape for every "
                            "step (auto: when compiling)"
    )

    @model_validator(mode="after")
    def _template_path(self) -> "TrainSection":
        if self.chat_template not in ("base", "chatml") and not self.chat_template.endswith((".jinja", ".j2")):
            raise ValueError(
                f"chat_template {self.chat_template!r}: use 'base', 'chatml', or a path to a .jinja file"
            )
        return self
