"""The whole pipeline as a user runs it: `wb run` on a tiny base, then status, verify and a skipped re-run.

Every stage is real (trl training, llama.cpp quantization, MLflow registry); only the base is tiny, so
the gate's thresholds are loosened to what a 2-layer random model can meet.
"""
from __future__ import annotations

import json

import pytest
import yaml

MODULES = ["json", "re", "os", "csv", "math", "random", "pathlib", "shutil", "logging", "sqlite3", "hashlib",
           "itertools", "argparse", "datetime", "tempfile", "subprocess", "heapq", "bisect", "zlib", "gzip"]


def _raw_records() -> list[dict]:
    rows = []
    for i, m in enumerate(MODULES):
        rows.append({"messages": [{"role": "user", "content": f"What is the {m} module for? (case {i})"},
                                  {"role": "assistant", "content": f"The {m} module is part of the standard library; "
                                                                    f"import {m} to use it. Its docs explain each function."}]})
        rows.append({"prompt": f"Show me how to import {m}.", "completion": f"Write `import {m}` at the top of the file."})
        rows.append({"text": f"{m} reference page {i}: functions, classes and examples of the {m} module, "
                             f"with notes on edge cases and version changes for {m}."})
    rows.append({"messages": [{"role": "assistant", "content": "an answer without a question"}]})  # quarantined
    return rows


@pytest.fixture
def pipeline_recipe(tmp_path, make_recipe, tiny_model_dir):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in _raw_records()))
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps(c) + "\n" for c in [
        {"id": "g1", "prompt": "Which module parses command line options?", "expect": [{"type": "contains", "values": ["argparse"]}]},
        {"id": "g2", "prompt": "Name a module for compressed files.", "expect": [{"type": "max_tokens", "value": 64}]},
    ]))
    drift = {"max_kld": 50.0, "min_top1": 0.0, "max_ppl_ratio": 100.0}  # a random 2-layer model drifts freely
    return make_recipe(
        base_dir=tiny_model_dir,
        name="pipeline",
        data={"raw": str(raw), "build": None, "golden": str(golden), "eval_fraction": 0.2},
        cleaning={"max_tokens": 256},
        train={"max_steps": 4, "batch_size": 4, "max_seq_len": 96, "save_steps": 2, "learning_rate": 0.01,
               "heldout_max_records": 8},
        quantize={"targets": [{"kind": "gguf", "types": ["F16", "Q8_0"]},
                              {"kind": "awq", "calibration_samples": 8, "calibration_max_len": 64}]},
        eval_gate={"golden": {"min_pass_rate": 0.0, "min_mean_score": 0.0, "max_new_tokens": 8, "min_gain_over_base": None},
                   "perplexity": {"margin": 0.0, "max_records": 8, "max_tokens": 64},
                   "drift": {"max_tokens": 64, "limits": {"F16": drift, "Q8_0": drift, "awq": drift}},
                   "safety": {"refusal_tolerance": 1.0, "max_new_tokens": 8}},
        registry={"model_name": "pipeline-test"},
    )


@pytest.mark.e2e
def test_wb_run_end_to_end_then_status_verify_and_skip(pipeline_recipe, run_cli, tmp_path):
    first = run_cli("-m", "workbench", "run", str(pipeline_recipe))
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-6000:]

    status = run_cli("-m", "workbench", "status", str(pipeline_recipe), check=True, env={"COLUMNS": "200"})
    rows = [line for line in status.stdout.splitlines() if line.count("│") >= 4]
    assert len(rows) == 5 and all("done" in r for r in rows), status.stdout

    verify = run_cli("-m", "workbench", "verify", str(pipeline_recipe), check=True)
    assert verify.stdout.count(": ok") == 5, verify.stdout

    # the lineage ends in the registry: publish's manifest holds every upstream manifest
    ws = tmp_path / "runs" / "pipeline"
    publish = json.loads((ws / "publish" / "manifest.json").read_text())
    assert set(publish["inputs"]) == {"clean", "train", "quantize", "eval_gate"}
    quantize_inputs = publish["inputs"]["quantize"]["manifest"]["inputs"]
    assert quantize_inputs["train"]["manifest"]["inputs"]["clean"]["manifest"]["stage"] == "clean"
    registered = json.loads((ws / "publish" / "registered.json").read_text())
    assert registered["model_name"] == "pipeline-test" and int(registered["version"]) >= 1

    # an unchanged re-run does no work: every manifest stays as it was
    before = {s: (ws / s / "manifest.json").read_bytes() for s in ("clean", "train", "quantize", "eval_gate", "publish")}
    again = run_cli("-m", "workbench", "run", str(pipeline_recipe))
    assert again.returncode == 0, again.stderr[-4000:]
    assert before == {s: (ws / s / "manifest.json").read_bytes() for s in before}

    # a train change makes train and everything after it stale, and leaves clean done
    data = yaml.safe_load(pipeline_recipe.read_text())
    data["train"]["r"] = 8
    pipeline_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    status = run_cli("-m", "workbench", "status", str(pipeline_recipe), check=True, env={"COLUMNS": "200"})
    states = {r.split("│")[1].strip(): r.split("│")[2].strip() for r in status.stdout.splitlines() if r.count("│") >= 4}
    assert states == {"clean": "done", "train": "stale", "quantize": "stale", "eval_gate": "stale", "publish": "stale"}
