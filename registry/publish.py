"""Publish: the gate-passed candidate becomes a registered model version, all or nothing.

Order matters for the all-or-nothing promise:
  1. refuse a failed or stale verdict; re-verify every input file against its stage manifest;
  2. create a LoggedModel (status PENDING) and upload every file, sha256.json last;
  3. check the upload (sizes as the store sees them), finalize the LoggedModel READY;
  4. register the version tagged `publish.status=incomplete`, move @candidate, then tag it `complete`.
A publish killed anywhere leaves either no registered version, or one that is not `complete`: promote and
pull refuse those, and the next publish marks them `failed` (and their LoggedModels FAILED).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from workbench.workspace import StageError, Workspace, manifest_hash, pid_alive, stage_output, verify_tree

from .files import SHA256_MANIFEST, dump_manifest, manifest_digest, pickle_problem
from .store import COMPLETE, FILES_DIGEST_TAG, STATUS_TAG, logged_model_id, move_alias, retry
from .summary import version_description

CANDIDATE_ALIAS = "candidate"
DESCRIPTION_LIMIT = 4800  # MLflow keeps 5000 characters of a version description


def run(recipe, args) -> int:
    with stage_output(recipe, "publish", force=getattr(args, "force", False)) as out:
        if out.skipped:
            return _already_published(recipe, out.final_dir)

        # -- setup: the verdict, and the exact files to publish (verified against their manifests)
        ws = out.workspace
        verdict = read_passed_verdict(ws)
        parts = collect_parts(ws, keep_merged=recipe.registry.keep_merged)
        parts.update(copy_manifests(ws, out.dir / "manifests"))
        files = {rel: info for rel, (_src, info) in sorted(parts.items())}
        sha_manifest = {"model_name": recipe.registry.model_name, "recipe": recipe.name, "files": files}
        (out.dir / SHA256_MANIFEST).write_text(dump_manifest(sha_manifest))
        tags = version_tags(recipe, ws, verdict, sha_manifest)
        print(f"publish: {len(files)} files verified, {sum(f['size'] for f in files.values()) / 1e6:.1f} MB", flush=True)

        # -- run: upload and register
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow
        from mlflow import MlflowClient

        from workbench.tracking import setup_mlflow, tracking_uri

        exp_id = setup_mlflow(recipe)
        client = MlflowClient(tracking_uri=tracking_uri(recipe), registry_uri=tracking_uri(recipe))
        uri = redact(tracking_uri(recipe))
        model_name = recipe.registry.model_name
        mark_interrupted_publishes(client, exp_id, model_name)

        with mlflow.start_run(experiment_id=exp_id, run_name=f"publish-{recipe.name}") as run:
            mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("metric.")})
            logged = mlflow.initialize_logged_model(
                name=model_name, source_run_id=run.info.run_id, experiment_id=exp_id,
                tags={"publish.pid": str(os.getpid()), "publish.host": socket.gethostname(), **tags},
            )
            try:
                upload(client, logged.model_id, parts, out.dir / SHA256_MANIFEST)
                check_upload(client, logged.model_id, files)
                mlflow.finalize_logged_model(logged.model_id, "READY")
            except BaseException:
                # best effort: a killed process cannot get here, and the next publish marks it FAILED then
                try:
                    mlflow.finalize_logged_model(logged.model_id, "FAILED")
                except Exception:
                    pass
                raise
            link_dataset(ws, logged.model_id)
            # not retried: a retry after a lost response could register the same upload twice
            version = mlflow.register_model(
                f"models:/{logged.model_id}", model_name,
                tags={**tags, STATUS_TAG: "incomplete", "publish.pid": str(os.getpid()), "publish.host": socket.gethostname()})
            gate_run = (ws.manifest("eval_gate") or {}).get("results", {}).get("mlflow_run_id")
            client.update_model_version(model_name, version.version,
                                        description=version_description(verdict, gate_run)[:DESCRIPTION_LIMIT])
            move_alias(client, model_name, CANDIDATE_ALIAS, version.version)
            retry("mark complete", lambda: client.set_model_version_tag(model_name, version.version, STATUS_TAG, COMPLETE))

        registered = {
            "model_name": model_name,
            "version": int(version.version),
            "run_id": run.info.run_id,
            "model_uri": f"models:/{model_name}/{version.version}",
            "tracking_uri": uri,
            "model_id": logged.model_id,
            "alias": CANDIDATE_ALIAS,
            "files_sha256": tags[FILES_DIGEST_TAG],
        }
        (out.dir / "registered.json").write_text(json.dumps(registered, indent=2) + "\n")
        out.results.update(registered)
        print(f"publish: registered {model_name} v{version.version} as @{CANDIDATE_ALIAS} "
              f"({len(files)} files) in {uri}")
    return 0


def _already_published(recipe, out_dir: Path) -> int:
    from workbench.tracking import tracking_uri

    reg = json.loads((out_dir / "registered.json").read_text())
    if reg["tracking_uri"] != redact(tracking_uri(recipe)):
        raise StageError(f"{out_dir}: published to {reg['tracking_uri']}, but the store is now "
                         f"{redact(tracking_uri(recipe))}; publish there with --force")
    print(f"publish: up to date: {reg['model_name']} v{reg['version']} ({reg['model_uri']})")
    return 0


def copy_manifests(ws: Workspace, dest: Path) -> dict[str, tuple[Path, dict]]:
    """Every upstream stage manifest, copied into the version: its lineage travels with the files."""
    dest.mkdir(exist_ok=True)
    parts = {}
    for stage in ("clean", "train", "quantize", "eval_gate"):
        dst = dest / f"{stage}.json"
        dst.write_bytes((ws.stage_dir(stage) / "manifest.json").read_bytes())
        parts[f"manifests/{stage}.json"] = (dst, {"size": dst.stat().st_size, "sha256": manifest_hash(dst)})
    return parts


def read_passed_verdict(ws: Workspace) -> dict[str, Any]:
    """The gate verdict, refused when it failed or was made for other candidate files than today's."""
    gate = ws.require("eval_gate")
    path = gate / "verdict.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; the eval gate must write its verdict before publish")
    try:
        verdict = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if verdict.get("passed") is not True:
        failed = [f"{c.get('name')}[{c.get('artifact')}]" for c in verdict.get("checks", [])
                  if c.get("gating", True) and not c.get("passed")]
        raise StageError(f"{path}: the gate verdict did not pass (failed: {', '.join(failed) or 'passed=false'}); "
                         "nothing is published")
    # the verdict names the candidate it judged (the quantize manifest: every served artifact descends from it)
    judged = verdict.get("candidate_manifest_sha256")
    current = manifest_hash(ws.stage_dir("quantize") / "manifest.json")
    if judged != current:
        raise StageError(f"{path}: stale verdict: it judged candidate manifest {judged}, but quantize/manifest.json "
                         f"is now {current}; re-run `python -m eval_gate RECIPE`")
    return verdict


def collect_parts(ws: Workspace, keep_merged: bool) -> dict[str, tuple[Path, dict[str, Any]]]:
    """published path -> (local file, {"size", "sha256"}), every file re-verified against its stage manifest."""
    layout = [("train", "adapter/", "adapter/"), ("eval_gate", "", "gate/"),
              ("quantize", "gguf/", "gguf/"), ("quantize", "gguf_adapter/", "gguf_adapter/"), ("quantize", "awq/", "awq/")]
    if keep_merged:
        layout.insert(1, ("quantize", "merged/", "merged/"))
    parts: dict[str, tuple[Path, dict[str, Any]]] = {}
    for stage, prefix, target in layout:
        root = ws.stage_dir(stage)
        listed = {rel: info for rel, info in ws.manifest(stage)["files"].items() if rel.startswith(prefix)}
        if stage == "train" and not listed:
            raise StageError(f"{root / prefix}: the train manifest lists no adapter files")
        problems = verify_tree(root, listed)
        on_disk = {p.relative_to(root).as_posix() for p in (root / prefix).rglob("*") if p.is_file()} \
            if prefix and (root / prefix).is_dir() else set()
        problems += [f"{root / rel}: not in the {stage} manifest (added after the stage ran)"
                     for rel in sorted(on_disk - set(listed))]
        problems += [bad for rel in listed if (bad := pickle_problem(root / rel))]
        if problems:
            raise StageError(f"{root}: files do not match the {stage} manifest; nothing is published:\n  "
                             + "\n  ".join(problems))
        for rel, info in listed.items():
            parts[target + rel[len(prefix):]] = (root / rel, {"size": info["size"], "sha256": info["sha256"]})
    return parts


def version_tags(recipe, ws: Workspace, verdict: dict, sha_manifest: dict) -> dict[str, str]:
    """What a reviewer and the gate of the next candidate read off the version (docs/registry.md)."""
    train_m, quant_m, clean_m, gate_m = (ws.manifest(s) for s in ("train", "quantize", "clean", "eval_gate"))
    base = recipe.base_model
    fingerprints = clean_m.get("results", {}).get("fingerprints", {})
    tags = {
        "base_model": base.label,
        "base_model.revision": base.revision or "",
        "base_model.sha256": json.dumps(base.sha256 or {}, sort_keys=True),
        "dataset.digest": _digest(fingerprints),
        "recipe.name": recipe.name,
        "recipe.sha256": recipe.recipe_hash(),
        "code.commit": code_commit(),
        "train.method": str(train_m.get("results", {}).get("method", "")),
        "train.run_id": str(train_m.get("results", {}).get("mlflow_run_id") or ""),
        "gate.run_id": str(gate_m.get("results", {}).get("mlflow_run_id") or ""),
        "gate.passed": "true" if verdict.get("passed") is True else "false",
        "quant.types": ",".join(a["name"] for a in quant_m.get("results", {}).get("artifacts", [])),
        FILES_DIGEST_TAG: manifest_digest(sha_manifest),
        "files.count": str(len(sha_manifest["files"])),
    }
    for name, value in sorted(fingerprints.items()):
        tags[f"dataset.fingerprint.{name}"] = str(value)
    # the libraries that made the weights: training's, then quantization's on top
    libs = {**train_m.get("libraries", {}), **quant_m.get("libraries", {})}
    for name, version in sorted(libs.items()):
        tags[f"lib.{name}"] = str(version)
    for check in verdict.get("checks", []):
        value = check.get("value")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tags[metric_tag(check)] = repr(float(value))
    return tags


def metric_tag(check: dict) -> str:
    """`metric.<name>` or, for a per-artifact check, `metric.<name>.<artifact>` (e.g. metric.kld.gguf:Q4_K_M)."""
    if check.get("metric"):
        return f"metric.{check['metric']}"
    name, artifact = str(check.get("name")), check.get("artifact")
    return f"metric.{name}.{artifact}" if artifact else f"metric.{name}"


def upload(client, model_id: str, parts: dict[str, tuple[Path, dict]], sha_path: Path) -> None:
    """One file at a time, with a progress line each; the sha256 manifest goes last."""
    for i, (rel, (src, info)) in enumerate(sorted(parts.items()), 1):
        print(f"publish: uploading [{i}/{len(parts)}] {rel} ({info['size']} bytes)", flush=True)
        parent = rel.rsplit("/", 1)[0] if "/" in rel else None
        if src.name != rel.rsplit("/", 1)[-1]:
            raise StageError(f"{src}: published name {rel} differs from the file name")  # layout bug guard
        retry(f"upload {rel}", lambda: client.log_model_artifact(model_id, str(src), parent))
    print(f"publish: uploading {SHA256_MANIFEST}", flush=True)
    client.log_model_artifact(model_id, str(sha_path))


def check_upload(client, model_id: str, files: dict[str, dict]) -> None:
    """Every file the store now holds has the size we sent; nothing missing, nothing extra."""
    seen: dict[str, int] = {}

    def walk(path: str | None) -> None:
        for info in client.list_logged_model_artifacts(model_id, path):
            if info.is_dir:
                walk(info.path)
            else:
                seen[info.path] = info.file_size

    walk(None)
    expected = {**{k: v["size"] for k, v in files.items()}}
    seen.pop(SHA256_MANIFEST, None)
    problems = [f"{k}: missing in the store" for k in expected if k not in seen]
    problems += [f"{k}: {seen[k]} bytes in the store, {v} sent" for k, v in expected.items()
                 if k in seen and seen[k] is not None and seen[k] != v]
    problems += [f"{k}: in the store but not published" for k in seen if k not in expected]
    if problems:
        raise StageError("upload check failed:\n  " + "\n  ".join(problems))


def link_dataset(ws: Workspace, model_id: str) -> None:
    """Record the cleaned dataset (by its fingerprints) as the model's input, through mlflow.data."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import LoggedModelInput

    fingerprints = ws.manifest("clean").get("results", {}).get("fingerprints", {})
    for split in ("train", "eval"):
        if split not in fingerprints:
            continue
        with warnings.catch_warnings():
            # two registered local-file source types claim file:// URIs; either records the same path
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source((ws.stage_dir("clean") / split).as_uri())
        # MLflow keeps 36 characters of a digest; the full fingerprint is the dataset.fingerprint.* tag
        ds = MetaDataset(source=source, name=f"{ws.recipe.name}/clean/{split}", digest=str(fingerprints[split])[:36])
        mlflow.log_input(ds, context="training" if split == "train" else "eval", model=LoggedModelInput(model_id))


def mark_interrupted_publishes(client, exp_id: str, model_name: str) -> None:
    """Earlier publishes of this model on this host whose process died: LoggedModel FAILED, version `failed`."""
    from mlflow.exceptions import MlflowException

    host = socket.gethostname()
    dead: set[str] = set()
    for lm in pending_logged_models(client, exp_id):
        pid = lm.tags.get("publish.pid", "")
        if lm.name == model_name and lm.tags.get("publish.host") == host and pid.isdigit() and not pid_alive(int(pid)):
            client.finalize_logged_model(lm.model_id, "FAILED")
            dead.add(lm.model_id)
            print(f"publish: marked interrupted upload {lm.model_id} (pid {pid}) FAILED", file=sys.stderr)
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return
    for v in versions:
        pid = v.tags.get("publish.pid", "")
        died = v.tags.get("publish.host") == host and pid.isdigit() and not pid_alive(int(pid))
        if v.tags.get(STATUS_TAG) == "incomplete" and (logged_model_id(v) in dead or died):
            client.set_model_version_tag(model_name, v.version, STATUS_TAG, "failed")
            print(f"publish: marked interrupted version {model_name} v{v.version} failed", file=sys.stderr)


def pending_logged_models(client, exp_id: str) -> list:
    """LoggedModels still PENDING (filtered here: MLflow 3.17's `status = 'PENDING'` filter matches nothing)."""
    from mlflow.entities import LoggedModelStatus

    found, token = [], None
    while True:
        page = client.search_logged_models(experiment_ids=[exp_id], max_results=100, page_token=token)
        found += [lm for lm in page if lm.status == LoggedModelStatus.PENDING]
        token = page.token
        if not token:
            return found


def redact(uri: str) -> str:
    """A tracking URI fit for files and logs: user:password@ removed (MLFLOW_TRACKING_URI may carry them)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def _digest(fingerprints: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest() if fingerprints else ""


def code_commit() -> str:
    """The commit of the code that publishes (CI sets GITHUB_SHA); '-dirty' when the tree has local changes."""
    if os.environ.get("GITHUB_SHA"):
        return os.environ["GITHUB_SHA"]
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
