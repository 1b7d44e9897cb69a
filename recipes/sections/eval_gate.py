from __future__ import annotations

from pydantic import Field

from .common import StrictModel


class EvalGateSection(StrictModel):
    """Checks and thresholds of the eval gate. (Owned by eval_gate.)"""

    golden_min_pass_rate: float = Field(0.5, ge=0.0, le=1.0)
    perplexity_margin: float = Field(0.0, ge=0.0, description="fine-tune perplexity must be below base by this fraction")
    max_new_tokens: int = Field(64, gt=0)
