from __future__ import annotations

import re

from pydantic import Field, field_validator

from .common import StrictModel

# Types the built-in PII detectors emit (data_cleaning.pii.PII_TYPES, kept here so that validating a recipe
# imports no detector); user patterns may not reuse them (their counts would mix).
BUILTIN_PII_TYPES = ("EMAIL", "PHONE", "IPV4", "IPV6", "CREDIT_CARD", "IBAN", "API_KEY", "NATIONAL_ID", "SECRET",
                     "PERSON", "ADDRESS")


class CleaningSection(StrictModel):
    """Rules of the data_cleaning stage; each can be switched off. (Owned by data_cleaning.)

    Rules run in this order and each record meets at most one dropping rule, so the report reconciles:
    schema (quarantine) -> normalize -> pii -> length -> decontaminate -> exact_dedup -> near_dedup.
    """

    normalize: bool = Field(True, description="Unicode NFC, control characters removed, whitespace tidied")
    max_record_bytes: int = Field(
        8_000_000, gt=0, description="a raw line longer than this is quarantined unread (never held in memory)"
    )
    min_tokens: int | None = Field(None, ge=0, description="drop records shorter than this in base-tokenizer tokens")
    max_tokens: int | None = Field(None, gt=0, description="drop records longer than this in base-tokenizer tokens")
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0, description="MinHash Jaccard threshold")
    near_dup_shingle: int = Field(3, ge=1, le=16, description="words per shingle for MinHash")
    near_dup_num_perm: int = Field(128, ge=16, le=512, description="MinHash permutations")
    pii: bool = True
    pii_types: list[str] = Field(
        default_factory=lambda: list(BUILTIN_PII_TYPES),
        description="the built-in PII types to replace (drop one to keep it); user patterns always run",
    )
    pii_phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR"],
        description="ISO country codes whose national phone layouts (no +) are looked for, with libphonenumber",
    )
    pii_ner_model: str | None = Field(
        None, description="local directory of a spaCy pipeline or transformers token-classification model whose "
                          "person entities are replaced as PERSON, on top of the rules (slower)",
    )
    pii_salt_env: str = Field("WB_PII_SALT", description="environment variable holding the placeholder salt")
    extra_pii_patterns: dict[str, str] = Field(default_factory=dict, description="TYPE -> regex")
    pii_allowlist: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "0.0.0.0", "255.255.255.255", "::1"],
        description="exact values never replaced (well-known addresses that document, not identify)",
    )
    decontaminate: bool = True
    decontam_ngram: int = Field(8, ge=3)
    decontam_threshold: float = Field(0.5, gt=0.0, le=1.0)
    upsample: dict[str, int] = Field(
        default_factory=dict,
        description="raw `source` value -> times each of its kept train records is written (a small mix, such "
                    "as refusals, is otherwise too rare in a short fine-tune to be learned); eval is not repeated",
    )

    @field_validator("upsample")
    @classmethod
    def _factors(cls, v: dict[str, int]) -> dict[str, int]:
        for source, k in v.items():
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100:
                raise ValueError(f"upsample[{source!r}] = {k!r}: a whole number of copies from 1 to 100")
        return v

    @field_validator("pii_types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in BUILTIN_PII_TYPES]
        if unknown:
            raise ValueError(f"unknown PII type(s) {', '.join(map(repr, unknown))}; the built-in types are "
                             + ", ".join(BUILTIN_PII_TYPES))
        if len(set(v)) != len(v):
            raise ValueError("a PII type is listed twice")
        return v

    @field_validator("pii_phone_regions")
    @classmethod
    def _regions(cls, v: list[str]) -> list[str]:
        import phonenumbers  # its region list only (the metadata of each region loads on first use)

        for region in v:
            if region not in phonenumbers.SUPPORTED_REGIONS:
                raise ValueError(f"phone region {region!r} is not a region libphonenumber knows; use a two-letter "
                                 "ISO country code in capitals, like US or DE")
        return v

    @field_validator("extra_pii_patterns")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                raise ValueError(f"PII type {name!r} must be UPPER_SNAKE_CASE (it becomes the placeholder <{name}_xxxx>)")
            if name in BUILTIN_PII_TYPES:
                raise ValueError(f"PII type {name!r} is built in; give your pattern another name")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern for {name!r} is not a valid regex: {exc}") from None
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_above_min(cls, v, info):
        lo = info.data.get("min_tokens")
        if v is not None and lo is not None and v < lo:
            raise ValueError(f"max_tokens {v} is below min_tokens {lo}")
        return v
