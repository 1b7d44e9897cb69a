"""The shipped scale-out configs on CPU: two "machines" on 127.0.0.1 (accelerate_configs/multinode.yaml, one
process each) train the same model as one process with the same global batch; FSDP (accelerate_configs/fsdp.yaml)
needs GPUs, and on a CPU machine the stage says so before any work instead of silently running data parallel."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests._train_helpers import make_clean

REPO = Path(__file__).resolve().parents[3]
# dropout 0: every rank draws its own dropout masks, which a single process cannot reproduce; float32: the
# comparison is about how the ranks share the work, and bfloat16 rounds two half-batches differently from one batch
SCALE_TRAIN = {"max_steps": 4, "save_steps": 100, "logging_steps": 1, "max_seq_len": 128, "learning_rate": 0.003,
               "warmup_ratio": 0.0, "heldout_max_records": 0, "dropout": 0.0, "precision": "float32"}


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _accelerate() -> str:
    return shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(recipe: Path) -> tuple[dict, dict]:
    out = recipe.parent / "runs" / recipe.stem / "train"
    metrics = json.loads((out / "metrics.json").read_text())
    from safetensors.torch import load_file

    return metrics, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_two_machines_on_localhost_train_what_one_process_trains(tiny_model_dir, make_recipe, run_cli):
    """Global batch 4 either way: one process with batch_size 4, or two machines of one process with 2 each
    (each rank takes every other batch of 2 of the same shuffled order, and the Trainer averages the loss over
    the tokens of all ranks). Same training losses within 1e-4 relative, and every adapter weight within a tenth
    of one optimizer step (Adam moves a weight by up to the learning rate, 3e-3, per step) of the single
    process's: only float summation orders differ (the gloo all-reduce, padding to another batch length), and
    Adam's first steps amplify that noise in the smallest gradients. The eval loss agrees within 1e-3 relative:
    the Trainer averages it per batch, and the batches differ."""
    single = make_recipe(base_dir=tiny_model_dir, name="single", train={**SCALE_TRAIN, "batch_size": 4})
    make_clean(single)
    run_cli("-m", "train", str(single), check=True)

    multi = make_recipe(base_dir=tiny_model_dir, name="multi", train={**SCALE_TRAIN, "batch_size": 2})
    make_clean(multi)
    port = str(_free_port())
    machines = [
        subprocess.Popen([_accelerate(), "launch", "--config_file", "accelerate_configs/multinode.yaml",
                          "--machine_rank", str(rank), "--num_machines", "2", "--num_processes", "2",
                          "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                          "train", str(multi)],
                         cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    try:
        logs = [m.communicate(timeout=900) for m in machines]
    finally:
        for m in machines:
            m.kill()
    for m, (out, err) in zip(machines, logs):
        assert m.returncode == 0, err[-4000:]
    assert sum(out.count("train: wrote") for out, _ in logs) == 1  # the global main process alone writes

    ref, ref_adapter = _outputs(single)
    got, adapter = _outputs(multi)
    assert got["world_size"] == 2 and [r["rank"] for r in got["ranks"]] == [0, 1]
    assert all(r["batches"] >= 4 and r["trained_tokens"] > 0 for r in got["ranks"])
    assert sum(r["trained_tokens"] for r in got["ranks"]) == ref["ranks"][0]["trained_tokens"]
    ref_losses = [p["loss"] for p in ref["loss_curve"]]
    assert [p["loss"] for p in got["loss_curve"]] == pytest.approx(ref_losses, rel=1e-4)
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-3)
    assert adapter.keys() == ref_adapter.keys()
    for name, tensor in adapter.items():
        assert (tensor - ref_adapter[name]).abs().max() < 3e-4, name


def test_fsdp_launch_on_cpus_is_refused_before_any_work(tiny_model_dir, make_recipe):
    """accelerate 1.15 turns on FSDP only for GPU-like process groups; a CPU group is MULTI_CPU, where the FSDP
    settings are dropped and every rank would hold the whole model. The stage refuses that launch by name."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = make_recipe(base_dir=tiny_model_dir, name="fsdp", train={**SCALE_TRAIN, "batch_size": 2})
    make_clean(recipe)
    proc = subprocess.run([_accelerate(), "launch", "--config_file", "accelerate_configs/fsdp.yaml",
                           "--num_processes", "2", "--mixed_precision", "no", "train", str(recipe)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "FSDP" in proc.stderr and "cpu_ddp.yaml" in proc.stderr, proc.stderr[-3000:]
    ws = recipe.parent / "runs" / "fsdp"
    assert not (ws / "train").exists() and not (ws.parent / "mlflow").exists()
