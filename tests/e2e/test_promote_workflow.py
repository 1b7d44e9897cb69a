""".github/workflows/promote.yml, executed as written against the PostgreSQL + basic-auth MLflow server.

What a runner does is done here, step by step: `actions/checkout` is a copy of the tracked files, `actions/setup-python`
is a fresh virtual environment of this Python (no system site-packages, nothing of the project's .venv), and every
`run:` step is run by bash with the job's and the step's `env:`, the `${{ inputs.* }}`, `${{ vars.* }}` and
`${{ secrets.* }}` expressions filled in, and only when its `if:` holds. So the install step really installs into
an empty environment (and must not need torch), and promote/rollback are the workflow's own command lines.

Not exercised here: the `production` environment's required reviewers (a GitHub setting) and the concurrency group.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _registry_helpers import copy_stages, derive_recipe, shared_stages
from test_registry_server import _api, _env, server, wb  # noqa: F401  (server: the module's own PostgreSQL + MLflow)

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "promote.yml"
MODEL = "wf-model"
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                  "No matching distribution found", "Could not find a version that satisfies")

pytestmark = pytest.mark.server


def _expr(text: str, ctx: dict) -> str:
    """Fill in ${{ inputs.x }}, ${{ vars.X }}, ${{ secrets.X }} the way Actions does (unknown -> empty string)."""
    def one(m: re.Match) -> str:
        scope, _, key = m.group(1).strip().partition(".")
        return str(ctx.get(scope, {}).get(key, ""))

    return re.sub(r"\$\{\{\s*([A-Za-z_]+\.[A-Za-z0-9_]+)\s*\}\}", one, text)


def _condition(expr: str | None, ctx: dict) -> bool:
    if not expr:
        return True
    m = re.fullmatch(r"\s*inputs\.(\w+)\s*==\s*'([^']*)'\s*", expr)
    assert m, f"promote.yml: an `if:` this test cannot evaluate: {expr!r}"
    return str(ctx["inputs"].get(m.group(1), "")) == m.group(2)


class Runner:
    """One checkout + one fresh Python, reused by the runs below (each run is the workflow's job)."""

    def __init__(self, root: Path):
        self.workflow = yaml.safe_load(WORKFLOW.read_text())
        self.job = self.workflow["jobs"]["promote"]
        self.checkout = root / "checkout"
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        for rel in filter(None, tracked.decode().split("\0")):
            if (REPO / rel).is_file():
                (self.checkout / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, self.checkout / rel)
        self.python_dir = root / "python"
        base_python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base_python, "-m", "venv", str(self.python_dir)], check=True, timeout=300)

    def defaults(self) -> dict:
        inputs = self.workflow[True if True in self.workflow else "on"]["workflow_dispatch"]["inputs"]
        return {k: v.get("default", "") for k, v in inputs.items()}

    def run(self, names: tuple[str, ...], inputs: dict, vars_: dict, secrets: dict) -> list[subprocess.CompletedProcess]:
        """The job's steps named in `names` (in the workflow's order), as Actions runs them; stops at a failure."""
        ctx = {"inputs": {**self.defaults(), **inputs}, "vars": vars_, "secrets": secrets}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV", "PYTHON"))}
        base["PATH"] = f"{self.python_dir / 'bin'}{os.pathsep}{base['PATH']}"
        base.update(GITHUB_ACTOR="ci-bot", GITHUB_RUN_ID="4242", CI="true")
        job_env = {k: _expr(str(v), ctx) for k, v in (self.job.get("env") or {}).items()}
        done = []
        for step in self.job["steps"]:
            if step.get("name") not in names or "run" not in step or not _condition(step.get("if"), ctx):
                continue
            env = {**base, **job_env, **{k: _expr(str(v), ctx) for k, v in (step.get("env") or {}).items()}}
            proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", _expr(step["run"], ctx)],
                                  cwd=self.checkout, env=env, capture_output=True, text=True, timeout=1200)
            done.append(proc)
            if proc.returncode != 0:
                break
        return done


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("runner"))
    (install,) = r.run(("Install the registry CLI (no torch needed)",), {}, {}, {})
    if install.returncode != 0 and any(e in install.stdout + install.stderr for e in NETWORK_ERRORS):
        pytest.skip("promote.yml's install step needs the package index, which this machine cannot reach:\n"
                    + (install.stdout + install.stderr)[-800:])
    assert install.returncode == 0, install.stdout + install.stderr
    return r


@pytest.fixture(scope="module")
def published(server, tmp_path_factory, tiny_model_dir):
    """Two versions of MODEL on the server (v2 under @candidate), published by the admin from the full install."""
    built = shared_stages(tmp_path_factory, tiny_model_dir)
    root = tmp_path_factory.mktemp("wf-ws")
    copy_stages(built["root"], root)
    recipe = derive_recipe(Path(built["recipe"]), root, registry={"model_name": MODEL, "tracking_uri": server["uri"]})
    for extra in ([], ["--force"]):
        proc = subprocess.run([sys.executable, "-m", "registry", "publish", str(recipe), *extra], cwd=REPO,
                              capture_output=True, text=True, timeout=600, env=_env(server["admin"]))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return recipe


def _alias(server, alias: str) -> str | None:
    status, body = _api(server["uri"], "GET", f"registered-models/alias?name={MODEL}&alias={alias}", None,
                        server["admin"])
    return body["model_version"]["version"] if status == 200 else None


def test_the_install_step_needs_no_torch(runner):
    py = runner.python_dir / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import importlib.util as u, sys; "
                                           "sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers', 'peft')))"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, "the workflow's environment has torch, transformers or peft installed"
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0
    assert (runner.python_dir / "bin" / "wb").is_file()


def test_workflow_promotes_an_approved_version_refuses_an_unapproved_one_and_rolls_back(runner, server, published):
    steps = ("Promote", "Roll back")
    vars_ = {"MLFLOW_TRACKING_URI": server["uri"]}
    secrets = dict(zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), server["admin"]))
    wb(server["admin"], "approve", MODEL, "--version", "1", "--by", "alice", "--tracking-uri", server["uri"])

    (ok,) = runner.run(steps, {"action": "promote", "model": MODEL, "version": "1", "reason": "first release"},
                       vars_, secrets)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{MODEL} v1 is now @champion" in ok.stdout and _alias(server, "champion") == "1"

    # @candidate is v2, gate-passed but not approved: the job fails and nothing moves
    (refused,) = runner.run(steps, {"action": "promote", "model": MODEL, "reason": "try v2"}, vars_, secrets)
    assert refused.returncode == 1 and "approval missing" in refused.stderr, refused.stdout + refused.stderr
    assert _alias(server, "champion") == "1"

    wb(server["admin"], "approve", MODEL, "--alias", "candidate", "--by", "bob", "--tracking-uri", server["uri"])
    (second,) = runner.run(steps, {"action": "promote", "model": MODEL, "reason": "v2 approved"}, vars_, secrets)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _alias(server, "champion") == "2" and _alias(server, "previous") == "1"
    status, body = _api(server["uri"], "GET", f"model-versions/get?name={MODEL}&version=2", None, server["admin"])
    audit = json.loads({t["key"]: t["value"] for t in body["model_version"]["tags"]}["audit.promoted"])
    assert audit["by"] == "ci-bot" and audit["why"] == "v2 approved (run 4242)"

    (back,) = runner.run(steps, {"action": "rollback", "model": MODEL, "reason": "regression"}, vars_, secrets)
    assert back.returncode == 0, back.stdout + back.stderr
    assert _alias(server, "champion") == "1"
    for proc in (ok, refused, second, back):
        assert server["admin"][1] not in proc.stdout + proc.stderr
