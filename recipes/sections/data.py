from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .common import StrictModel


class DataSection(StrictModel):
    """Where the raw domain data and the golden set are. Relative paths resolve against the working directory."""

    raw: Path = Field(description="raw JSONL: chat (`messages`), prompt/completion, or plain `text` records")
    build: Literal["pydoc", "tools"] | None = Field(
        None, description="build `raw` with a shipped corpus builder when the file does not exist: 'tools' = the "
                          "stdlib tool-calling corpus (demo/stdlib_tools.py), 'pydoc' = the stdlib Q&A corpus "
                          "(demo/stdlib_qa.py)"
    )
    golden: Path = Field(description="golden set JSONL used by the eval gate; training data is decontaminated against it")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of records in the eval split")
