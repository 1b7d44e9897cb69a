"""The published file set: its layout, its sha256 manifest, and the checks every reader repeats.

A registered version's artifacts look like this (paths relative to the LoggedModel's artifact root):

    adapter/            PEFT adapter + tokenizer + chat template      (train/adapter)
    merged/             full-precision merged model (registry.keep_merged)   (quantize/merged)
    gguf/               model-<TYPE>.gguf for each type + Modelfile   (quantize/gguf)
    awq/                compressed-tensors W4A16 directory            (quantize/awq)
    gate/               verdict.json, report.md, plots               (eval_gate/)
    manifests/          every stage's manifest.json (the lineage)
    sha256.json         {"files": {path: {"size", "sha256"}}}: every file above, nothing else

sha256.json is uploaded last, and its own sha256 is a tag of the version (`files.sha256`), so the manifest
cannot be swapped along with a file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SHA256_MANIFEST = "sha256.json"

# Weight formats accepted here: safetensors and GGUF. Anything that unpickles on load is refused, on publish
# and on pull, whatever its name claims.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def pickle_problem(path: Path) -> str | None:
    """Why a file is refused as a possible pickle, or None. Checks the name and, for weights, the magic bytes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"{path}: pickle-format file refused (only safetensors and GGUF weights are accepted)"
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".gguf" and not head.startswith(b"GGUF"):
        return f"{path}: not a GGUF file (bad magic {head[:4]!r})"
    if path.suffix == ".safetensors":
        # 8-byte little-endian header length, then a JSON header starting with '{'
        with open(path, "rb") as f:
            f.seek(8)
            if f.read(1) != b"{":
                return f"{path}: not a safetensors file (no JSON header)"
    elif head.startswith(_PICKLE_MAGIC) and path.suffix not in (".gguf", ".json", ".md", ".txt", ".jinja"):
        return f"{path}: looks like a pickle/zip archive (magic {head[:4]!r}); refused"
    return None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of sha256.json exactly as it is written (canonical JSON)."""
    return hashlib.sha256(dump_manifest(manifest).encode()).hexdigest()


def dump_manifest(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def verify_files(root: Path, files: dict[str, dict[str, Any]], prefix: str = "") -> list[str]:
    """Problems re-hashing every manifest file under `prefix` below root (empty = verified).

    Also lists files present under the prefix that the manifest does not name (nothing unverified is served).
    """
    from workbench.workspace import verify_tree

    wanted = dict(sorted((rel, info) for rel, info in files.items() if rel.startswith(prefix)))
    problems = [] if wanted else [f"{root}: the sha256 manifest lists no file under {prefix or '/'!r}"]
    problems += verify_tree(root, wanted)
    # a pickle is refused even when its bytes are the ones that were published
    problems += [bad for rel in wanted if (root / rel).is_file() and (bad := pickle_problem(root / rel))]
    base = root / prefix if prefix else root
    if base.exists():
        for p in sorted(base.rglob("*") if base.is_dir() else [base]):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in files and rel != SHA256_MANIFEST:
                problems.append(f"{rel}: not in the sha256 manifest; refused")
    return problems
