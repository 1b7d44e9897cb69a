"""Crash-safe training checkpoints in the workspace scratch area.

    .scratch/train/<key>/
        staging/             the Trainer writes checkpoint-N here (may be half-written when killed)
        checkpoints/         complete checkpoints only: moved here by one rename once every rank is done
        mlflow_run_id        the MLflow run this training logs to, so a resumed run continues it

`key` hashes everything the training depends on (the train and base_model sections, the seed, the clean
manifest), so a changed recipe or changed data starts fresh instead of resuming a foreign checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from workbench.workspace import Workspace, _fsync_dir

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointStore:
    def __init__(self, ws: Workspace):
        fingerprint = ws.fingerprint("train")
        self.key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.root = ws.scratch("train") / self.key
        self.staging = self.root / "staging"
        self.complete = self.root / "checkpoints"

    def prepare(self, is_main: bool) -> None:
        """Main process: drop half-written checkpoints of a killed run, create the directories."""
        if is_main:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True, exist_ok=True)
            self.complete.mkdir(parents=True, exist_ok=True)
            (self.root / "key.json").write_text(json.dumps({"key": self.key}))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None to start from step 0."""
        if not self.complete.is_dir():
            return None
        found = [(int(m.group(1)), p) for p in self.complete.iterdir() if (m := _CHECKPOINT.match(p.name))]
        return max(found)[1] if found else None

    def promote(self, step: int, keep: int) -> Path:
        """Move staging/checkpoint-<step> into checkpoints/ in one rename; keep the newest `keep`."""
        src = self.staging / f"checkpoint-{step}"
        for path in src.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(src)
        dst = self.complete / src.name
        if dst.exists():  # a re-save of the same step after a crash between save and promote
            shutil.rmtree(dst)
        os.replace(src, dst)
        _fsync_dir(self.complete)
        steps = sorted((int(m.group(1)), p) for p in self.complete.iterdir() if (m := _CHECKPOINT.match(p.name)))
        for _, old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return dst

    def read_run_id(self) -> str | None:
        p = self.root / "mlflow_run_id"
        return p.read_text().strip() or None if p.is_file() else None

    def write_run_id(self, run_id: str) -> None:
        tmp = self.root / "mlflow_run_id.tmp"
        tmp.write_text(run_id)
        os.replace(tmp, self.root / "mlflow_run_id")

    def clear(self) -> None:
        """After the stage output is committed the checkpoints are no longer needed."""
        shutil.rmtree(self.root, ignore_errors=True)


class PromoteCheckpoints(TrainerCallback):
    """After the Trainer saved a checkpoint (every rank wrote its part), make it visible atomically."""

    def __init__(self, store: CheckpointStore, keep: int):
        self.store, self.keep = store, keep

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # rank 1 writes its own RNG state file into the checkpoint
        if state.is_world_process_zero:
            self.store.promote(state.global_step, self.keep)
        _barrier()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
