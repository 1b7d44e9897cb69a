"""What the gate reads, checked before any model is loaded: the upstream manifests and the artifacts they list,
the golden / red-team / canary sets, the training texts (for contamination) and held-out token ids."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes import Recipe
from workbench.workspace import StageError, Workspace, manifest_hash, sha256_file

from .golden import (SHIPPED_OVERREFUSAL, SHIPPED_REDTEAM, load_canaries, load_golden, load_overrefusal,
                     load_redteam)

FORMATS = ("hf", "gguf", "gguf-lora", "compressed-tensors")


@dataclass
class Artifact:
    name: str  # "adapter", "merged", "gguf:Q8_0", "awq"
    format: str  # "peft", "hf", "gguf", "gguf-lora", "compressed-tensors"
    path: Path
    parent: str | None
    lora_base: Path | None = None  # gguf-lora: the F16 base GGUF the adapter (path) is applied to

    @property
    def quant_type(self) -> str | None:
        if self.format == "gguf":
            return self.name.split(":", 1)[1]
        if self.format == "gguf-lora":
            return "F16"  # an F16 adapter on the F16 base: judged against the adapter on base in transformers
        if self.format == "compressed-tensors":
            return "awq"
        return None


@dataclass
class Inputs:
    base_dir: Path
    adapter_dir: Path
    artifacts: list[Artifact]
    candidate_sha256: str
    golden: list
    redteam: list
    overrefusal: list
    canaries: list
    training_texts: list[str]
    records: list[list[int]]  # held-out token ids (adapter tokenizer), perplexity and drift
    golden_sha256: str
    redteam_sha256: str
    overrefusal_sha256: str
    tokenizer: Any


def load_inputs(recipe: Recipe, ws: Workspace) -> Inputs:
    from datasets import load_from_disk

    from workbench.base import resolve_base

    from .engines import load_tokenizer

    cfg = recipe.eval_gate
    base_dir = resolve_base(recipe.base_model)
    clean_dir, train_dir, quant_dir = ws.require("clean"), ws.require("train"), ws.require("quantize")
    adapter_dir = train_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StageError(f"{adapter_dir}: no adapter_config.json (the train stage writes the PEFT adapter here)")
    artifacts = [Artifact("adapter", "peft", adapter_dir, None)] + listed_artifacts(recipe, ws)

    golden_path = Path(recipe.data.golden)
    redteam_path = Path(cfg.safety.redteam) if cfg.safety.redteam else SHIPPED_REDTEAM
    overrefusal_path = Path(cfg.safety.overrefusal) if cfg.safety.overrefusal else SHIPPED_OVERREFUSAL
    tokenizer = load_tokenizer(adapter_dir)
    train_ds = load_from_disk(str(clean_dir / "train"))
    return Inputs(
        base_dir=base_dir, adapter_dir=adapter_dir, artifacts=artifacts,
        candidate_sha256=manifest_hash(quant_dir / "manifest.json"),
        golden=load_golden(golden_path), redteam=load_redteam(redteam_path),
        overrefusal=load_overrefusal(overrefusal_path),
        canaries=load_canaries(Path(cfg.safety.canaries)),
        training_texts=[" \n".join(m["content"] for m in msgs) for msgs in train_ds["messages"]],
        records=heldout_records(clean_dir / "heldout_text", tokenizer, cfg.perplexity.max_records,
                                cfg.perplexity.max_tokens),
        golden_sha256=sha256_file(golden_path), redteam_sha256=sha256_file(redteam_path),
        overrefusal_sha256=sha256_file(overrefusal_path), tokenizer=tokenizer,
    )


def listed_artifacts(recipe: Recipe, ws: Workspace) -> list[Artifact]:
    """The quantize manifest's artifacts, each checked: it exists, its format is known, drift limits exist for its
    quant type, and its parent is listed."""
    quant_dir = ws.stage_dir("quantize")
    where = quant_dir / "manifest.json"
    listed = (ws.manifest("quantize") or {}).get("results", {}).get("artifacts")
    if not isinstance(listed, list):
        raise StageError(f"{where}: results.artifacts is missing (docs/stages.md, quantize/)")
    out = []
    for i, a in enumerate(listed):
        try:
            art = Artifact(a["name"], a["format"], quant_dir / a["path"], a.get("parent"),
                           quant_dir / a["base_path"] if a["format"] == "gguf-lora" else None)
        except (KeyError, TypeError):
            raise StageError(f"{where}: results.artifacts[{i}] lacks name/format/path (gguf-lora: base_path): {a!r}") from None
        for path in (art.path, art.lora_base):
            if path is not None and not path.exists():
                raise StageError(f"{path}: artifact {art.name!r} listed in the quantize manifest does not exist")
        if art.format not in FORMATS:
            raise StageError(f"{where}: artifact {art.name!r} has unknown format {art.format!r}")
        if art.quant_type is not None and art.quant_type not in recipe.eval_gate.drift.limits and art.parent is not None:
            raise StageError(f"eval_gate.drift.limits: no limits for quant type {art.quant_type!r} "
                             f"(artifact {art.name}); add them to the recipe")
        out.append(art)
    names = {"adapter"} | {a.name for a in out}
    for a in out:
        if a.parent is not None and a.parent not in names:
            raise StageError(f"{where}: artifact {a.name!r} names parent {a.parent!r}, which is not listed")
    return out


def heldout_records(path: Path, tokenizer, max_records: int, max_tokens: int) -> list[list[int]]:
    """Token ids of the first held-out texts (each cut to max_tokens): every engine is scored on these ids."""
    from datasets import load_from_disk

    heldout = load_from_disk(str(path))
    if "text" not in heldout.column_names:
        raise StageError(f"{path}: no `text` column (columns: {heldout.column_names})")
    records = []
    for text in heldout["text"]:
        if len(records) >= max_records:
            break
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            records.append(ids)
    if not records:
        raise StageError(f"{path}: no record has 2 or more tokens; perplexity needs held-out text")
    return records


def base_sha256(recipe: Recipe, base_dir: Path) -> str:
    from workbench.base import weight_hashes

    hashes = recipe.base_model.sha256 or weight_hashes(base_dir)
    if len(hashes) == 1:
        return next(iter(hashes.values()))
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
