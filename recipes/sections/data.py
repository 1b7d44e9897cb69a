from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .common import StrictModel


class DataSection(StrictModel):
    """Where the raw domain data and the golden set are. Relative paths resolve against the working directory."""

    raw: Path = Field(description="raw JSONL: chat (`messages`), prompt/completion, or plain `text` records")
    build: Literal["pydoc"] | None = Field(
        None, description="build `raw` from a shipped source builder when the file does not exist"
    )
    golden: Path = Field(description="golden set JSONL used by the eval gate; training data is decontaminated against it")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of records in the eval split")
