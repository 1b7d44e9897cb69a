"""The registry against a production-shaped store: PostgreSQL + `mlflow server --app-name basic-auth` on
127.0.0.1 (demo/mlflow_server.py), and the MLflow UI driven by headless Debian Chromium.

Skipped (with the reason) when PostgreSQL, chromium or the auth app's packages are missing: `make sysdeps`.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from _registry_helpers import copy_stages, derive_recipe, no_tracking_env, shared_stages, subprocess_env

REPO = Path(__file__).resolve().parents[2]
MODEL = "reg-server-model"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.server


def _missing_requirements() -> str | None:
    from demo.mlflow_server import postgres_bin

    if postgres_bin() is None:
        return "PostgreSQL binaries (initdb, pg_ctl) not found; install postgresql (`make sysdeps`)"
    for module, pkg in (("psycopg2", "psycopg2-binary"), ("flask_wtf", "Flask-WTF")):
        try:
            __import__(module)
        except ImportError:
            return f"python package {pkg} not installed (needed by mlflow server's basic-auth app)"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _missing_requirements()
    if reason:
        pytest.skip(reason)
    from demo.mlflow_server import LocalServer

    admin = {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_urlsafe(18)}
    saved = {k: os.environ.get(k) for k in admin}
    os.environ.update(admin)
    srv = LocalServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        srv.start()
        reader = ("reader", secrets.token_urlsafe(18))
        _api(srv.tracking_uri, "POST", "users/create", {"username": reader[0], "password": reader[1]},
             ("admin", admin["MLFLOW_AUTH_ADMIN_PASSWORD"]))
        yield {"srv": srv, "uri": srv.tracking_uri, "admin": ("admin", admin["MLFLOW_AUTH_ADMIN_PASSWORD"]),
               "reader": reader}
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _api(uri: str, method: str, endpoint: str, body: dict | None, auth: tuple[str, str] | None):
    """One MLflow REST call; returns (status, json)."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    data = json.dumps(body).encode() if body is not None and method != "GET" else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {"body": e.read().decode(errors="replace")}


def _env(creds: tuple[str, str]) -> dict:
    return subprocess_env(MLFLOW_TRACKING_USERNAME=creds[0], MLFLOW_TRACKING_PASSWORD=creds[1])


def wb(creds, *args: str, check: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """A registry command as user `creds`: in this process (mlflow imported once), or as a real subprocess."""
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "workbench", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env=_env(creds))
    else:
        from workbench.cli import main

        out, err = io.StringIO(), io.StringIO()
        with as_user(creds), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
        proc = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"wb {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def as_user(creds: tuple[str, str]):
    """MLflow reads credentials from the environment at each request: set them for one in-process command."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict(zip(keys, creds)))
    try:
        with no_tracking_env():
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def on_server(server, tmp_path_factory, tiny_model_dir):
    """The shared stage outputs, published by the admin to the server: v1 under @candidate."""
    built = shared_stages(tmp_path_factory, tiny_model_dir)
    root = tmp_path_factory.mktemp("server-ws")
    copy_stages(built["root"], root)
    recipe = derive_recipe(Path(built["recipe"]), root, registry={"model_name": MODEL, "tracking_uri": server["uri"]})
    proc = subprocess.run([sys.executable, "-m", "registry", "publish", str(recipe)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=_env(server["admin"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reg = json.loads((root / "runs" / "reg" / "publish" / "registered.json").read_text())
    return {**built, "recipe": str(recipe), "root": root, "registered": reg, "publish_output": proc.stdout + proc.stderr}


def test_unauthenticated_is_401_and_reader_cannot_move_aliases(server, on_server):
    uri = server["uri"]
    status, _ = _api(uri, "GET", "registered-models/get?name=" + MODEL, None, None)
    assert status == 401
    status, _ = _api(uri, "GET", "registered-models/get?name=" + MODEL, None, ("admin", "wrong-password-1234"))
    assert status == 401
    status, body = _api(uri, "GET", "registered-models/get?name=" + MODEL, None, server["reader"])
    assert status == 200 and body["registered_model"]["name"] == MODEL
    v = str(on_server["registered"]["version"])
    status, _ = _api(uri, "POST", "registered-models/alias", {"name": MODEL, "alias": "champion", "version": v},
                     server["reader"])
    assert status == 403
    # the same refusal through the CLI, after every promotion condition is met
    wb(server["admin"], "approve", MODEL, "--version", v, "--by", "alice", "--tracking-uri", uri)
    refused = wb(server["reader"], "promote", MODEL, "--version", v, "--tracking-uri", uri, check=False,
                 subprocess_=True)
    assert refused.returncode == 1 and "403" in refused.stderr and "Permission denied" in refused.stderr
    status, body = _api(uri, "GET", f"registered-models/alias?name={MODEL}&alias=champion", None, server["admin"])
    assert status in (400, 404), body  # no such alias: nobody moved it


def test_secrets_stay_out_of_recipes_outputs_and_logs(server, on_server):
    password = server["admin"][1]
    assert password not in Path(on_server["recipe"]).read_text()
    assert password not in on_server["publish_output"]
    for p in list((on_server["root"] / "runs" / "reg" / "publish").rglob("*")) + [server["srv"].log_path,
                                                                               server["srv"].root / "basic_auth.ini"]:
        if p.is_file():
            assert password.encode() not in p.read_bytes(), p
            assert server["srv"].pg_password.encode() not in p.read_bytes(), p


def test_publish_promote_rollback_pull_against_the_server(server, on_server, tmp_path):
    uri, admin, reader = server["uri"], server["admin"], server["reader"]
    v1 = str(on_server["registered"]["version"])
    recipe = on_server["recipe"]
    wb(admin, "approve", MODEL, "--version", v1, "--by", "alice", "--tracking-uri", uri)
    wb(admin, "promote", MODEL, "--version", v1, "--tracking-uri", uri, "--reason", "first")
    proc = subprocess.run([sys.executable, "-m", "registry", "publish", recipe, "--force"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=_env(admin))
    assert proc.returncode == 0, proc.stderr
    v2 = str(json.loads((on_server["root"] / "runs" / "reg" / "publish" / "registered.json").read_text())["version"])
    refused = wb(admin, "promote", MODEL, "--alias", "candidate", "--tracking-uri", uri, check=False)
    assert refused.returncode == 1 and "approval missing" in refused.stderr
    wb(admin, "approve", MODEL, "--alias", "candidate", "--by", "bob", "--tracking-uri", uri)
    wb(admin, "promote", MODEL, "--alias", "candidate", "--tracking-uri", uri)
    assert wb(reader, "rollback", MODEL, "--tracking-uri", uri, check=False).returncode == 1
    wb(admin, "rollback", MODEL, "--tracking-uri", uri, "--reason", "test")
    status, body = _api(uri, "GET", f"registered-models/alias?name={MODEL}&alias=champion", None, reader)
    assert status == 200 and body["model_version"]["version"] == v1 and v2 != v1
    # a READ user may pull; every format verifies after its trip through the server's artifact proxy
    formats = ["adapter", "merged", f"gguf:{on_server['quant_types'][1]}"] + (["awq"] if on_server["awq"] else [])
    for fmt in formats:
        out = wb(reader, "pull", f"models:/{MODEL}@champion", "--format", fmt, "--dest", str(tmp_path / "d"),
                 "--tracking-uri", uri).stdout
        assert "(verified)" in out
    assert (tmp_path / "d" / "merged" / "model.safetensors").is_file()


@pytest.mark.browser
def test_mlflow_ui_shows_the_version_and_a_reviewer_approves_it_there(server, on_server):
    """The reviewer's path: open the candidate in the MLflow UI, read verdict + tags, add the approval tags;
    then (and only then) CI can promote it."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found; install Debian chromium (`make sysdeps`)")
    from playwright.sync_api import sync_playwright

    uri, admin = server["uri"], server["admin"]
    status, body = _api(uri, "GET", f"registered-models/alias?name={MODEL}&alias=candidate", None, admin)
    v = body["model_version"]["version"]
    for key in ("approval", "approved_by"):  # start unapproved, whatever earlier tests did
        _api(uri, "DELETE", "model-versions/delete-tag", {"name": MODEL, "version": v, "key": key}, admin)
    refused = wb(admin, "promote", MODEL, "--version", v, "--tracking-uri", uri, check=False)
    assert refused.returncode == 1 and "approval missing" in refused.stderr

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(http_credentials={"username": admin[0], "password": admin[1]}).new_page()
            # the UI keeps polling the server, so "network idle" may never come: wait for what must be shown
            page.goto(f"{uri}/#/models/{MODEL}/versions/{v}", wait_until="load", timeout=120_000)
            for text in (f"Version {v}", "gate.passed", "Eval gate: PASSED"):
                page.get_by_text(text).first.wait_for(timeout=120_000)
            body_text = page.inner_text("body")
            assert "@ candidate" in body_text or "candidate" in body_text
            for tag in ("gate.passed", "metric.golden_pass_rate", "files.sha256", "train.run_id", "dataset.digest"):
                assert tag in body_text, f"tag {tag} not shown on the version page"
            # the description: verdict, then base -> candidate for the key metrics, rounded, and where the report is
            assert "Eval gate: PASSED" in body_text and "golden pass rate" in body_text and "0.80" in body_text
            assert "gate/report.html" in body_text
            for key, value in {"approval": "approved", "approved_by": "ui-reviewer"}.items():
                page.get_by_placeholder("Name", exact=True).fill(key)
                page.get_by_placeholder("Value", exact=True).fill(value)
                page.get_by_test_id("add-tag-button").click()
                page.get_by_text(value, exact=True).first.wait_for(timeout=30_000)
        finally:
            browser.close()
    status, body = _api(uri, "GET", f"model-versions/get?name={MODEL}&version={v}", None, admin)
    tags = {t["key"]: t["value"] for t in body["model_version"].get("tags", [])}
    assert tags.get("approval") == "approved" and tags.get("approved_by") == "ui-reviewer"
    wb(admin, "promote", MODEL, "--version", v, "--tracking-uri", uri, "--reason", "approved in the UI")
    status, body = _api(uri, "GET", f"registered-models/alias?name={MODEL}&alias=champion", None, admin)
    assert body["model_version"]["version"] == v
