from __future__ import annotations

from pydantic import Field

from .common import StrictModel


class CleaningSection(StrictModel):
    """Rules of the data_cleaning stage; each can be switched off. (Owned by data_cleaning.)"""

    normalize: bool = True
    max_tokens: int | None = Field(None, gt=0, description="drop records longer than this in base-tokenizer tokens")
    min_tokens: int | None = Field(None, ge=0)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0, description="MinHash Jaccard threshold")
    pii: bool = True
    pii_salt_env: str = Field("WB_PII_SALT", description="environment variable holding the placeholder salt")
    extra_pii_patterns: dict[str, str] = Field(default_factory=dict, description="TYPE -> regex")
    decontaminate: bool = True
    decontam_ngram: int = Field(8, ge=3)
    decontam_threshold: float = Field(0.5, gt=0.0, le=1.0)
