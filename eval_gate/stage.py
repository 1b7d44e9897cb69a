"""The eval gate: one verdict on the artifacts that will actually be served.

    setup    read the upstream manifests, the golden / red-team / canary sets, held-out text, the tokenizer
    run      base model (cached by its sha256), then every artifact: adapter on base, merged, each GGUF, AWQ
    judge    every check of the verdict, and the champion comparison
    save     verdict.json + report.md/html + plots, an MLflow run, the stage manifest; exit 1 when the verdict fails
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from recipes import Recipe
from workbench.workspace import stage_output

from .evaluate import evaluate, log
from .inputs import load_inputs
from .verdict import GateResult, judge


def run(recipe: Recipe, args: argparse.Namespace) -> int:
    from .report import write_report

    with stage_output(recipe, "eval_gate", force=args.force) as out:
        if out.skipped:
            log(f"{out.final_dir} is up to date (use --force to re-run)")
            return finish(json.loads((out.final_dir / "verdict.json").read_text()), out.final_dir)
        started = time.time()
        inp = load_inputs(recipe, out.workspace)
        scratch = out.workspace.scratch("eval_gate")
        try:
            result = judge(recipe, inp, evaluate(recipe, inp, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # multi-MB log-prob arrays; nothing to resume from
        result.seconds = time.time() - started
        verdict = result.verdict()
        (out.dir / "verdict.json").write_text(json.dumps(verdict, indent=2, default=_json_default))
        write_report(out.dir, result)
        run_id = log_to_mlflow(result, out.dir)
        out.results.update({
            "passed": result.passed, "failed": verdict["failed"], "mlflow_run_id": run_id,
            "candidate_manifest_sha256": inp.candidate_sha256, "metrics": result.metrics(),
            "seconds": round(time.time() - started, 1),
        })
    return finish(verdict, out.final_dir)


def log_to_mlflow(result: GateResult, out_dir: Path) -> str:
    import mlflow

    from workbench.tracking import setup_mlflow

    setup_mlflow(result.recipe)
    with mlflow.start_run(run_name=f"eval_gate-{result.recipe.name}") as run:
        mlflow.set_tags({"stage": "eval_gate", "gate.passed": str(result.passed).lower(),
                         "candidate_manifest_sha256": result.inputs.candidate_sha256})
        mlflow.log_metrics(result.metrics())
        mlflow.log_metric("gate_passed", float(result.passed))
        mlflow.log_artifacts(str(out_dir))
        return run.info.run_id


def finish(verdict: dict[str, Any], out_dir: Path) -> int:
    if verdict["passed"]:
        log(f"PASSED: {out_dir / 'report.md'}")
        return 0
    print(f"eval_gate: FAILED checks ({len(verdict['failed'])}):", file=sys.stderr)
    for c in verdict["checks"]:
        if c["gating"] and not c["passed"]:
            print(f"  - {c['metric']}: {_fmt(c['value'])} vs threshold {_fmt(c['threshold'])}"
                  + (f" ({c['detail']})" if c.get("detail") else ""), file=sys.stderr)
    print(f"eval_gate: report: {out_dir / 'report.md'}", file=sys.stderr)
    return 1


def _json_default(o):
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
