from __future__ import annotations

import re

from pydantic import Field, field_validator

from .common import StrictModel


class RegistrySection(StrictModel):
    """Where candidates are published. Secrets never live here: credentials come from the environment."""

    model_name: str = Field(description="registered model name")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; unset = the embedded SQLite store in the workspace. "
        "MLFLOW_TRACKING_URI in the environment wins over both.",
    )
    experiment: str | None = Field(None, description="MLflow experiment name; default: the recipe name")
    keep_merged: bool = Field(True, description="publish the merged full-precision model as well")

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", v):
            raise ValueError("model_name may hold letters, digits, '.', '_' and '-' only")
        return v

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v and re.match(r"^[a-z+]+://[^/@]+:[^/@]+@", v):
            raise ValueError("tracking_uri carries credentials; set MLFLOW_TRACKING_USERNAME/PASSWORD in the environment")
        return v
