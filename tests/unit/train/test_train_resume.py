"""Crash safety, determinism and data-parallel training of the train stage (tiny model, real processes)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._train_helpers import make_clean
from workbench.workspace import sha256_file

REPO = Path(__file__).resolve().parents[3]
RESUME_TRAIN = {"max_steps": 8, "batch_size": 4, "save_steps": 2, "logging_steps": 2, "max_seq_len": 128,
                "learning_rate": 0.003, "heldout_max_records": 0}


def _ws(recipe_path: Path) -> Path:
    import yaml

    data = yaml.safe_load(recipe_path.read_text())
    return Path(data["workspace"]) / data["name"]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def test_kill_9_mid_run_then_the_same_command_resumes_to_the_same_adapter(tiny_model_dir, make_recipe, run_cli):
    # reference: the same recipe and data, never interrupted
    ref = make_recipe(base_dir=tiny_model_dir, name="ref", train=RESUME_TRAIN)
    make_clean(ref)
    run_cli("-m", "train", str(ref), check=True)
    ref_out = _ws(ref) / "train"

    recipe = make_recipe(base_dir=tiny_model_dir, name="crash", train=RESUME_TRAIN)
    make_clean(recipe)
    ws = _ws(recipe)
    proc = subprocess.Popen([sys.executable, "-m", "train", str(recipe)], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        # kill as soon as the first complete checkpoint is visible, mid-training
        while not list((ws / ".scratch" / "train").glob("*/checkpoints/checkpoint-*")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (ws / "train").exists(), "a killed run must not leave a finished-looking output"
    saved = sorted((ws / ".scratch" / "train").glob("*/checkpoints/checkpoint-*"))
    assert saved and all((c / "trainer_state.json").is_file() for c in saved)
    killed_at = max(int(c.name.split("-")[1]) for c in saved)
    assert 0 < killed_at < 8
    run_id_before = next((ws / ".scratch" / "train").glob("*/mlflow_run_id")).read_text()

    again = run_cli("-m", "train", str(recipe))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    out = ws / "train"
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert metrics["resumed_from_step"] >= killed_at
    assert manifest["results"]["steps"] == 8
    assert manifest["results"]["mlflow_run_id"] == run_id_before  # the resumed run continues the same MLflow run
    # resuming restores weights, optimizer, scheduler, RNG and data order: bit-identical to the uninterrupted run
    assert sha256_file(out / "adapter" / "adapter_model.safetensors") == \
        sha256_file(ref_out / "adapter" / "adapter_model.safetensors")
    assert not list((ws / ".scratch" / "train").glob("*/checkpoints"))


def test_changed_recipe_does_not_resume_a_foreign_checkpoint(tiny_model_dir, make_recipe):
    from recipes import load_recipe
    from train.checkpoints import CheckpointStore
    from workbench.workspace import Workspace

    first = make_recipe(base_dir=tiny_model_dir, name="keyed", train=RESUME_TRAIN)
    make_clean(first)
    store = CheckpointStore(Workspace(load_recipe(first)))
    store.prepare(is_main=True)
    (store.staging / "checkpoint-4").mkdir()
    (store.staging / "checkpoint-4" / "trainer_state.json").write_text("{}")
    store.promote(4, keep=2)
    assert store.latest().name == "checkpoint-4"
    # a half-written checkpoint in staging is never offered for resume
    (store.staging / "checkpoint-8").mkdir()
    assert CheckpointStore(Workspace(load_recipe(first))).latest().name == "checkpoint-4"

    changed = make_recipe(base_dir=tiny_model_dir, name="keyed", train={**RESUME_TRAIN, "learning_rate": 0.001})
    assert CheckpointStore(Workspace(load_recipe(changed))).latest() is None
    make_clean(first)  # same recipe, new data
    assert CheckpointStore(Workspace(load_recipe(first))).latest() is None


def test_two_process_ddp_on_cpu_trains_on_both_ranks_and_writes_one_adapter(tiny_model_dir, make_recipe):
    recipe = make_recipe(base_dir=tiny_model_dir, name="ddp", train={**RESUME_TRAIN, "max_steps": 4, "method": "dora"})
    make_clean(recipe)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    # the shipped config: MULTI_GPU with 2 processes; without GPUs that is a gloo group (--cpu would run one process)
    proc = subprocess.run([accelerate, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml", "train", str(recipe)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ws = _ws(recipe)
    assert proc.stdout.count("train: wrote") == 1  # only the main process writes
    metrics = json.loads((ws / "train" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert [r["rank"] for r in metrics["ranks"]] == [0, 1]
    assert all(r["batches"] >= 4 and r["trained_tokens"] > 0 for r in metrics["ranks"])
    adapter = ws / "train" / "adapter"
    assert list(adapter.glob("*.safetensors")) == [adapter / "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    assert not list(ws.glob(".tmp-train-*"))
