"""Run workspace and manifests.

    <workspace>/<recipe name>/
        clean/      manifest.json + datasets (Arrow) + report
        train/      manifest.json + PEFT adapter + tokenizer
        quantize/   manifest.json + merged/ gguf/ awq/
        eval_gate/  manifest.json + verdict.json + report.md
        publish/    manifest.json + the registered version it made
        .scratch/<stage>/   state that must survive a crash (training checkpoints)

A stage writes into a temporary sibling directory and renames it into place only after its manifest is
written, so a killed stage never leaves a directory that looks complete. A stage is *done* when its
manifest records the current recipe-section hash and the current manifest hashes of its inputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from recipes import Recipe

MANIFEST = "manifest.json"

@dataclass(frozen=True)
class Stage:
    """One stage: the directory it writes in the workspace, how users run it alone, and what it reads."""

    name: str
    command: tuple[str, ...]  # `python <command> RECIPE` runs it alone; `wb run` runs it the same way
    sections: tuple[str, ...]  # recipe sections it reads
    inputs: tuple[str, ...] = ()  # stages whose outputs it reads
    data_files: tuple[str, ...] = ()  # recipe `data` fields whose *content* it reads, not just their path

    @property
    def how_to_run(self) -> str:
        return " ".join(("python", *self.command, "RECIPE"))


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("clean", ("-m", "data_cleaning"), ("base_model", "data", "cleaning"), data_files=("raw", "golden")),
    Stage("train", ("-m", "train"), ("base_model", "train"), ("clean",)),
    # quantize reads clean/: AWQ calibrates on the domain data
    Stage("quantize", ("-m", "quantize"), ("base_model", "quantize"), ("clean", "train")),
    Stage("eval_gate", ("-m", "eval_gate"), ("base_model", "data", "eval_gate"), ("clean", "train", "quantize"),
          data_files=("golden",)),
    Stage("publish", ("-m", "registry", "publish"), ("registry",), ("clean", "train", "quantize", "eval_gate")),
)}

TRACKED_LIBRARIES = (
    "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "gguf",
    "llama_cpp_python", "llmcompressor", "compressed-tensors", "mlflow", "datasketch", "tokenizers", "safetensors",
)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """Every file below root (relative POSIX path) with its size and sha256."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip:
            files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def verify_tree(root: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems found re-hashing root against a manifest's file list (empty list = all verified)."""
    problems = []
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["size"]:
            problems.append(f"{p}: size {p.stat().st_size} != {info['size']}")
        elif sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 mismatch")
    return problems


def manifest_hash(manifest_path: Path) -> str:
    return sha256_file(manifest_path)


class Workspace:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.root = Path(recipe.workspace).resolve() / recipe.name

    def stage_dir(self, stage: str) -> Path:
        _check_stage(stage)
        return self.root / stage

    def scratch(self, stage: str) -> Path:
        """A directory that survives crashes (and `--force`), for state like training checkpoints."""
        d = self.root / ".scratch" / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self, stage: str) -> dict | None:
        p = self.stage_dir(stage) / MANIFEST
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def require(self, stage: str) -> Path:
        """The finished output directory of an upstream stage, or a clear error saying how to make it."""
        d = self.stage_dir(stage)
        if not (d / MANIFEST).is_file():
            raise StageError(f"{d}: stage '{stage}' has not run yet (run `{STAGES[stage].how_to_run}` or `wb run RECIPE`)")
        return d

    def fingerprint(self, stage: str) -> dict[str, Any]:
        """What a stage's output depends on: its recipe sections and its inputs' manifests."""
        spec = STAGES[stage]
        input_hashes = {}
        for s in spec.inputs:
            p = self.stage_dir(s) / MANIFEST
            input_hashes[s] = manifest_hash(p) if p.is_file() else None
        data_files = {}
        for key in spec.data_files:
            p = Path(getattr(self.recipe.data, key))
            data_files[key] = sha256_file(p) if p.is_file() else None
        return {"section_sha256": self.recipe.section_hash(*spec.sections), "inputs": input_hashes,
                "data_files": data_files}

    def status(self, stage: str) -> str:
        """'done', 'stale' (its recipe sections, data files or inputs changed, or an input is not done
        itself), or 'missing'. Reads manifests only."""
        m = self.manifest(stage)
        if m is None:
            return "missing"
        fp = self.fingerprint(stage)
        if any(self.status(s) != "done" for s in STAGES[stage].inputs):
            return "stale"  # an input will be re-made, so this output will be too
        recorded = {"section_sha256": m.get("section_sha256"),
                    "inputs": {k: v.get("manifest_sha256") for k, v in m.get("inputs", {}).items()},
                    "data_files": m.get("data_files", {})}
        return "done" if recorded == fp else "stale"

    def check_inputs(self, stage: str) -> None:
        """Every input stage is done, or a StageError saying which one to (re-)run: running on stale inputs would
        break the lineage."""
        for s in STAGES[stage].inputs:
            self.require(s)
            state = self.status(s)
            if state != "done":
                raise StageError(f"{self.stage_dir(s)}: input stage '{s}' is {state}; re-run it first "
                                 f"(`{STAGES[s].how_to_run}`)")


class StageError(RuntimeError):
    """A stage cannot run: the message names what is wrong and where."""


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


@dataclass
class StageOutput:
    """A stage's output being written. Write files under `dir`; put results for the manifest in `results`."""

    workspace: Workspace
    stage: str
    dir: Path
    final_dir: Path
    skipped: bool = False
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def commit(self) -> Path:
        """Write the manifest into the temporary directory, then swap it into place atomically."""
        if self.skipped:
            return self.final_dir
        ws, stage = self.workspace, self.stage
        fp = ws.fingerprint(stage)
        spec = STAGES[stage]
        manifest = {
            "stage": stage,
            "recipe": {"name": ws.recipe.name, "sha256": ws.recipe.recipe_hash()},
            "section_sha256": fp["section_sha256"],
            "sections": {s: ws.recipe.section_json(s) for s in spec.sections},
            "seed": ws.recipe.seed,
            "inputs": {
                s: {"manifest_sha256": fp["inputs"][s], "manifest": ws.manifest(s)} for s in spec.inputs
            },
            "data_files": fp["data_files"],
            "files": hash_tree(self.dir),
            "libraries": library_versions(),
            "platform": {"python": sys.version.split()[0], "machine": platform.machine(), "system": platform.system()},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "duration_s": round(time.time() - self.started, 3),
            "results": self.results,
        }
        tmp_manifest = self.dir / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp_manifest, self.dir / MANIFEST)
        _fsync_dir(self.dir)
        old = None
        if self.final_dir.exists():
            old = self.final_dir.with_name(f".old-{self.stage}-{os.getpid()}")
            os.replace(self.final_dir, old)
        os.replace(self.dir, self.final_dir)
        _fsync_dir(self.final_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final_dir

    def abort(self) -> None:
        if not self.skipped:
            shutil.rmtree(self.dir, ignore_errors=True)


def open_stage(recipe: Recipe, stage: str, force: bool = False) -> StageOutput:
    """Start writing a stage's output, or return a skipped output when it is already up to date.

    Checks that every input stage is done first (Workspace.check_inputs).
    """
    ws = Workspace(recipe)
    ws.check_inputs(stage)
    final = ws.stage_dir(stage)
    if not force and ws.status(stage) == "done":
        return StageOutput(ws, stage, final, final, skipped=True)
    ws.root.mkdir(parents=True, exist_ok=True)
    for leftover in ws.root.glob(f".tmp-{stage}-*"):
        # a killed earlier attempt; its pid is gone, its partial output is worthless
        pid = leftover.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = ws.root / f".tmp-{stage}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return StageOutput(ws, stage, tmp, final)


class stage_output:
    """Context manager around open_stage: commits on success, removes the partial output on error.

        with stage_output(recipe, "clean", force=args.force) as out:
            if out.skipped: ...
            write files to out.dir; out.results["records"] = n
    """

    def __init__(self, recipe: Recipe, stage: str, force: bool = False):
        self.out = open_stage(recipe, stage, force)

    def __enter__(self) -> StageOutput:
        return self.out

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.out.commit()
        else:
            self.out.abort()
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
