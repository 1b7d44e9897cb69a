from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import StrictModel

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BaseModelSection(StrictModel):
    """The pinned base model: a hub id at a 40-hex commit, or a local directory with weight sha256s.

    Nothing is downloaded at run time: a hub base must already be in the local Hugging Face cache.
    """

    hub_id: str | None = Field(None, description="Hugging Face repo id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    revision: str | None = Field(None, description="40-hex commit sha of hub_id (branch names and tags are refused)")
    path: Path | None = Field(None, description="local save_pretrained directory")
    sha256: dict[str, str] | None = Field(None, description="weight file name -> sha256, for a local path")
    provision: Literal["smollm2"] | None = Field(
        None, description="build `path` with `wb base smollm2` when it does not exist yet"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: Literal[False] = Field(False, description="always false: no remote code is ever run")

    @field_validator("revision")
    @classmethod
    def _revision_is_commit(cls, v: str | None) -> str | None:
        if v is not None and not _HEX40.match(v):
            raise ValueError(
                f"revision {v!r} is not a 40-hex commit sha; branch names and tags move, pin the commit"
            )
        return v

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if not v:
                raise ValueError("sha256 must list at least one weight file")
            for name, digest in v.items():
                if not _HEX64.match(digest):
                    raise ValueError(f"sha256 of {name!r} is not 64 lowercase hex characters")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "BaseModelSection":
        if (self.hub_id is None) == (self.path is None):
            raise ValueError("name exactly one of hub_id (with revision) or path (with sha256)")
        if self.hub_id is not None and self.revision is None:
            raise ValueError(f"hub_id {self.hub_id!r} needs a 40-hex revision")
        if self.path is not None and self.sha256 is None:
            raise ValueError("a local path needs sha256 of its weight files (see `wb base hash DIR`)")
        if self.provision is not None and self.path is None:
            raise ValueError("provision builds a local path: set path too")
        return self

    @property
    def label(self) -> str:
        """Human-readable pinned id, used in adapter configs and registry tags."""
        if self.hub_id:
            return f"{self.hub_id}@{self.revision}"
        return f"{self.path}"
