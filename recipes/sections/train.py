from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import StrictModel


class TrainSection(StrictModel):
    """LoRA / QLoRA / DoRA supervised fine-tuning. (Owned by train.)"""

    method: Literal["lora", "qlora", "dora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    learning_rate: float = Field(2e-4, gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(512, gt=0)
    save_steps: int = Field(50, gt=0, description="checkpoint every N steps (resume after a crash)")
    chat_template: Literal["base", "chatml"] | str = Field(
        "chatml", description="'base' keeps the base's template, 'chatml' ships one with generation markers, or a path"
    )
    assistant_only_loss: bool = True
