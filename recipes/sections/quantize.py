from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .common import StrictModel

# What llama.cpp's quantizer makes from an F16 file without an importance matrix. F16 is written by llama.cpp's
# own converter and is the parent of every other type.
GGUF_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")

AUTOAWQ_REFUSAL = (
    "engine 'autoawq' is not supported: AutoAWQ is archived upstream, silently corrupts weights on CPU "
    "(held-out perplexity ~40,000 on the demo) and transformers 5 cannot load its output without gptqmodel. "
    "Use `engine: llm-compressor` (the default): same AWQ algorithm, compressed-tensors output that vLLM "
    "serves and transformers loads back"
)


class GGUFTarget(StrictModel):
    kind: Literal["gguf"]
    types: list[str] = Field(
        default_factory=lambda: ["F16", "Q8_0", "Q4_K_M"], min_length=1,
        description=f"GGUF types to write; F16 is required (the others are quantized from it). One of {', '.join(GGUF_TYPES)}",
    )

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"unknown GGUF type(s) {', '.join(map(repr, unknown))}; choose from {', '.join(GGUF_TYPES)}")
        dups = sorted({t for t in v if v.count(t) > 1})
        if dups:
            raise ValueError(f"GGUF type(s) listed twice: {', '.join(dups)}")
        if "F16" not in v:
            raise ValueError("types must include F16: every other GGUF type is quantized from the F16 file")
        return ["F16"] + [t for t in v if t != "F16"]


class GGUFAdapterTarget(StrictModel):
    """The LoRA adapter as a GGUF adapter (llama.cpp's convert_lora_to_gguf.py) beside an F16 GGUF of the
    unmerged base: llama.cpp (`--lora`) and Ollama (`ADAPTER`) apply it at load time, no merge."""

    kind: Literal["gguf_adapter"]


class AWQTarget(StrictModel):
    kind: Literal["awq"]
    engine: str = Field("llm-compressor", description="only 'llm-compressor' (AutoAWQ is refused, see docs/quantization.md)")
    bits: Literal[4] = 4
    symmetric: bool = Field(False, description="asymmetric (with zero points) by default: W4A16_ASYM")
    group_size: int | None = Field(
        None, gt=0, description="None = the largest of 128/64/32 dividing every Linear input width of the model"
    )
    calibration_samples: int = Field(64, gt=0, description="records of the cleaned train split used to calibrate")
    calibration_max_len: int = Field(512, gt=0, description="tokens per calibration record (longer ones are truncated)")

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if v == "autoawq":
            raise ValueError(AUTOAWQ_REFUSAL)
        if v != "llm-compressor":
            raise ValueError(f"unknown AWQ engine {v!r}; the only engine is 'llm-compressor'")
        return v


Target = Annotated[Union[GGUFTarget, GGUFAdapterTarget, AWQTarget], Field(discriminator="kind")]


class QuantizeSection(StrictModel):
    """Merge the adapter, then produce each serving target. (Owned by quantize.)"""

    merge: bool = True
    merge_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the merged weights (the merge itself always runs in float32)"
    )
    # float32 sums in another order after the merge: ~1e-4 on one thread, 2.3e-3 seen on SmolLM2 with two; a
    # wrong merge (a lost scaling factor, another adapter) moves logits by tenths or more
    merge_check_tolerance: float = Field(
        1e-2, gt=0, description="max |logit| difference allowed between base+adapter and the merged model (float32)"
    )
    targets: list[Target] = Field(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _targets_need_the_merge(cls, data, handler):
        """gguf and awq targets are built from the merged model. Judged on the raw input too, so that a recipe
        with other problems in this section hears of this one in the same run."""
        if not isinstance(data, dict):  # an assignment (validate_assignment) or a section object: judge the result
            section = handler(data)
            if (problem := _merge_problem(section)) is not None:
                raise ValidationError.from_exception_data(cls.__name__, [problem])
            return section
        problem = _merge_problem(data)
        try:
            section = handler(data)
        except ValidationError as exc:
            if problem is None:
                raise
            errors = [{k: e[k] for k in ("type", "loc", "input", "ctx") if k in e} for e in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, errors + [problem]) from None
        if problem is not None:
            raise ValidationError.from_exception_data(cls.__name__, [problem])
        return section

    @field_validator("targets")
    @classmethod
    def _one_of_each(cls, v: list) -> list:
        kinds = [t.kind for t in v]
        dups = sorted({k for k in kinds if kinds.count(k) > 1})
        if dups:
            raise ValueError(f"target kind(s) listed twice: {', '.join(dups)} (list every GGUF type in one gguf target)")
        return v


def _merge_problem(data) -> dict | None:
    """The merge rule's error (pydantic line-error form) for raw section data or a section object, or None."""
    raw = isinstance(data, dict)
    merge = data.get("merge", True) if raw else data.merge
    targets = (data.get("targets") if raw else data.targets) or []
    kinds = [t.get("kind") if isinstance(t, dict) else getattr(t, "kind", None) for t in targets]
    if merge is False and ("gguf" in kinds or "awq" in kinds):
        return {"type": PydanticCustomError("merge_needed", "gguf and awq targets are built from the merged model; "
                                                            "set merge: true"), "loc": ("merge",), "input": merge}
    return None


def read_model_config(base_model: Any) -> dict | None:
    """The base's config.json when it can be found locally without loading anything (None otherwise).

    Torch-free, so that `wb validate` can refuse an unsupported architecture before any stage runs.
    """
    candidates: list[Path] = []
    if getattr(base_model, "path", None) is not None:
        candidates.append(Path(base_model.path) / "config.json")
    elif getattr(base_model, "hub_id", None) and getattr(base_model, "revision", None):
        try:
            from huggingface_hub.constants import HF_HUB_CACHE

            repo = "models--" + base_model.hub_id.replace("/", "--")
            candidates.append(Path(HF_HUB_CACHE) / repo / "snapshots" / base_model.revision / "config.json")
        except ImportError:
            pass
    for c in candidates:
        if c.is_file():
            try:
                return json.loads(c.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def architecture_problem(config: dict, needs_gguf: bool, needs_awq: bool = False,
                         awq_group_size: int | None = None) -> str | None:
    """Why the quantize stage cannot handle a model with this config.json (None when it can): an architecture
    llama.cpp's converter does not convert (GGUF targets) or llm-compressor has no AWQ mapping for (awq), or an
    AWQ group size that does not divide the model's Linear input widths."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "?")
    if needs_gguf:
        from quantize.gguf_convert import LLAMA_CPP_PYTHON, converter_architectures, missing_tools_message

        known = converter_architectures()
        if known is None:
            return f"GGUF targets need llama.cpp's converter: {missing_tools_message()}"
        if arch not in known:
            return (f"base model architecture {arch!r} is not supported by llama.cpp's convert_hf_to_gguf.py "
                    f"(llama-cpp-python {LLAMA_CPP_PYTHON}, {len(known)} architectures); drop the gguf targets "
                    "or pick a base it converts")
    if needs_awq:
        known = awq_mapped_architectures()
        if known is not None and arch not in known:
            return (f"base model architecture {arch!r} is not supported by llm-compressor's AWQ (it has no AWQ "
                    f"mapping for it; mapped: {', '.join(sorted(known))}); drop the awq target or pick a mapped base")
        if "hidden_size" in config and "intermediate_size" in config:  # else the stage's preflight checks it
            from quantize.awq import choose_group_size
            from workbench.workspace import StageError

            try:
                choose_group_size(config, awq_group_size)
            except StageError as exc:
                return str(exc)
    return None


def awq_mapped_architectures() -> frozenset[str] | None:
    """The architectures llm-compressor's AWQ has smoothing mappings for (its AWQ_MAPPING_REGISTRY), read from
    its source without importing it (that imports torch); None when llm-compressor is not installed. Any other
    architecture would get the Llama mapping, written for module names it may not have."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("llmcompressor")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(list(spec.submodule_search_locations)[0]) / "modifiers" / "transform" / "awq" / "mappings.py"
    if not src.is_file():
        return None
    for node in ast.parse(src.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "AWQ_MAPPING_REGISTRY" and isinstance(node.value, ast.Dict):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return None
