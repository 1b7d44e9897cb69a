"""The recipe: one typed model per section, composed here (rules that need the filesystem are in loader.py)."""
from __future__ import annotations

import hashlib
import json
import re

from pydantic import Field, field_validator

from .sections.base_model import BaseModelSection
from .sections.cleaning import CleaningSection
from .sections.common import StrictModel
from .sections.data import DataSection
from .sections.eval_gate import EvalGateSection
from .sections.quantize import QuantizeSection
from .sections.registry import RegistrySection
from .sections.train import TrainSection

SECTIONS = ("base_model", "data", "cleaning", "train", "quantize", "eval_gate", "registry")


class Recipe(StrictModel):
    name: str = Field(description="run name: the workspace is <workspace>/<name>/")
    seed: int = Field(0, ge=0)
    workspace: str = Field("runs", description="root of run workspaces (relative to the working directory)")
    base_model: BaseModelSection
    data: DataSection
    cleaning: CleaningSection
    train: TrainSection
    quantize: QuantizeSection
    eval_gate: EvalGateSection
    registry: RegistrySection

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9._-]*$", v):
            raise ValueError("name must be a lowercase slug (letters, digits, '.', '_', '-')")
        return v

    def section_json(self, name: str):
        """One section (or top-level field) as plain JSON data: what manifests record and hashes are made of."""
        value = getattr(self, name)
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value

    def section_hash(self, *names: str) -> str:
        """sha256 of the canonical JSON of the named sections: a stage re-runs when this changes."""
        payload = {n: self.section_json(n) for n in names}
        if "seed" not in names:
            payload["seed"] = self.seed
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def recipe_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
