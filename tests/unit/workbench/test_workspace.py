"""Run workspace: atomic stage output, manifests, skip-when-unchanged, stale detection, kill safety."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from recipes import load_recipe
from workbench.workspace import StageError, Workspace, open_stage, stage_output, verify_tree

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def recipe_path(tmp_path, make_recipe):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"not really weights, but pinned by hash")
    return make_recipe(base_dir=base)


def _write_clean(recipe, payload: str = "hello", force: bool = False):
    with stage_output(recipe, "clean", force=force) as out:
        if not out.skipped:
            (out.dir / "train").mkdir()
            (out.dir / "train" / "data.txt").write_text(payload)
            out.results["records"] = 1
    return out


def test_manifest_records_files_sections_libraries_and_seed(recipe_path):
    recipe = load_recipe(recipe_path)
    out = _write_clean(recipe)
    m = Workspace(recipe).manifest("clean")
    assert m["files"]["train/data.txt"]["size"] == 5
    assert verify_tree(out.final_dir, m["files"]) == []
    assert set(m["sections"]) == {"base_model", "data", "cleaning"}
    assert m["seed"] == recipe.seed and m["results"] == {"records": 1}
    assert "transformers" in m["libraries"] and "python" in m["libraries"]
    # tampering is detected by re-hashing
    (out.final_dir / "train" / "data.txt").write_text("HELLO")
    assert verify_tree(out.final_dir, m["files"]) == [f"{out.final_dir / 'train' / 'data.txt'}: sha256 mismatch"]


def test_unchanged_rerun_is_skipped_and_force_reruns(recipe_path):
    recipe = load_recipe(recipe_path)
    _write_clean(recipe)
    assert Workspace(recipe).status("clean") == "done"
    assert _write_clean(recipe).skipped
    before = Workspace(recipe).manifest("clean")["started_at"]
    time.sleep(1.1)
    assert not _write_clean(recipe, force=True).skipped
    assert Workspace(recipe).manifest("clean")["started_at"] != before


def test_recipe_change_and_upstream_rerun_make_stages_stale(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path)
    _write_clean(recipe)
    with stage_output(recipe, "train") as out:
        (out.dir / "adapter").mkdir()
    ws = Workspace(recipe)
    assert (ws.status("clean"), ws.status("train"), ws.status("quantize")) == ("done", "done", "missing")
    # a train-only change leaves clean done and makes train stale
    data = yaml.safe_load(recipe_path.read_text())
    data["train"]["r"] = 8
    recipe_path.write_text(yaml.safe_dump(data))
    changed = load_recipe(recipe_path)
    assert (Workspace(changed).status("clean"), Workspace(changed).status("train")) == ("done", "stale")
    # re-running clean (new manifest) makes train stale for the original recipe too
    time.sleep(1.1)
    _write_clean(recipe, payload="other", force=True)
    assert Workspace(recipe).status("train") == "stale"
    # and a stage refuses to run on stale inputs
    with pytest.raises(StageError, match="input stage 'train' is stale"):
        open_stage(recipe, "quantize")


def test_missing_input_stage_says_how_to_make_it(recipe_path):
    recipe = load_recipe(recipe_path)
    with pytest.raises(StageError, match=r"stage 'clean' has not run yet \(run `python -m data_cleaning RECIPE`"):
        open_stage(recipe, "train")


def test_failed_stage_leaves_nothing(recipe_path):
    recipe = load_recipe(recipe_path)
    with pytest.raises(RuntimeError):
        with stage_output(recipe, "clean") as out:
            (out.dir / "partial.txt").write_text("x")
            raise RuntimeError("boom")
    ws = Workspace(recipe)
    assert not ws.stage_dir("clean").exists()
    assert not list(ws.root.glob(".tmp-*"))


def test_killed_stage_leaves_no_manifest_and_rerun_completes(recipe_path):
    script = textwrap.dedent(f"""
        import sys, time
        from recipes import load_recipe
        from workbench.workspace import stage_output
        recipe = load_recipe({str(recipe_path)!r})
        with stage_output(recipe, "clean") as out:
            (out.dir / "big.bin").write_bytes(b"x" * 1000)
            print("WRITING", flush=True)
            time.sleep(60)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recipe = load_recipe(recipe_path)
    ws = Workspace(recipe)
    assert not (ws.stage_dir("clean") / "manifest.json").exists()
    assert ws.status("clean") == "missing"
    leftovers = list(ws.root.glob(".tmp-clean-*"))
    assert leftovers, "the killed attempt wrote only to a temporary directory"
    out = _write_clean(recipe)
    assert not out.skipped and ws.status("clean") == "done"
    assert not list(ws.root.glob(".tmp-clean-*")), "a dead attempt's temporary directory is cleared"
    assert _write_clean(recipe).skipped


def test_wb_status_reads_manifests(recipe_path, run_cli):
    recipe = load_recipe(recipe_path)
    _write_clean(recipe)
    proc = run_cli("-m", "workbench", "status", str(recipe_path), check=True, env={"COLUMNS": "200"})
    rows = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.count("│") >= 4}
    assert "done" in rows["clean"] and "missing" in rows["train"], proc.stdout


def test_changed_raw_data_makes_clean_stale(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path)
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"text": "one"}\n')
    recipe.data.raw = raw
    _write_clean(recipe)
    assert Workspace(recipe).status("clean") == "done"
    raw.write_text('{"text": "two"}\n')
    assert Workspace(recipe).status("clean") == "stale"


def test_status_shows_when_a_stage_finished_not_when_it_started():
    from workbench.cli import _finished_at

    assert _finished_at({"started_at": "2026-11-27T06:22:15Z", "duration_s": 845.2}) == "2026-11-27T06:36:20Z"
    assert _finished_at({}) == "" and _finished_at({"started_at": "yesterday"}) == ""
