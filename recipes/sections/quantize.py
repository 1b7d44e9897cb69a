from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from .common import StrictModel

GGUF_TYPES = ("F16", "BF16", "F32", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")


class GGUFTarget(StrictModel):
    kind: Literal["gguf"]
    types: list[Literal[GGUF_TYPES]] = Field(default_factory=lambda: ["F16", "Q8_0", "Q4_K_M"], min_length=1)  # type: ignore[valid-type]


class AWQTarget(StrictModel):
    kind: Literal["awq"]
    engine: Literal["llm-compressor"] = "llm-compressor"
    bits: Literal[4] = 4
    group_size: int | None = Field(None, gt=0, description="None = the largest of 128/64/32 dividing the hidden size")
    calibration_samples: int = Field(64, gt=0)
    calibration_max_len: int = Field(512, gt=0)


Target = Annotated[Union[GGUFTarget, AWQTarget], Field(discriminator="kind")]


class QuantizeSection(StrictModel):
    """Merge the adapter, then produce each serving target. (Owned by quantize.)"""

    merge: bool = True
    merge_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    targets: list[Target] = Field(default_factory=list)
