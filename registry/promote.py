"""Approve, promote and roll back registered versions. Every refusal names the condition that failed."""
from __future__ import annotations

import getpass
import json
import os
import tempfile
import time
from pathlib import Path

from workbench.workspace import StageError

from .files import SHA256_MANIFEST, manifest_digest, verify_files
from .store import (APPROVAL_TAG, APPROVED_BY_TAG, COMPLETE, FILES_DIGEST_TAG, STATUS_TAG, alias_version,
                    get_version, move_alias, retry)

CHAMPION, PREVIOUS = "champion", "previous"


def actor(explicit: str | None = None) -> str:
    """Who acts: --by, else the CI actor, else the MLflow user, else the login name."""
    return (explicit or os.environ.get("GITHUB_ACTOR") or os.environ.get("MLFLOW_TRACKING_USERNAME")
            or getpass.getuser())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def approve(client, model: str, version: str | None, alias: str | None, by: str | None, reject: bool = False,
            note: str = "") -> str:
    mv = get_version(client, model, version, alias)
    who = actor(by)
    for key, value in ((APPROVAL_TAG, "rejected" if reject else "approved"), (APPROVED_BY_TAG, who),
                       ("approved_at", _now()), ("approval_note", note)):
        retry(f"tag {key}", lambda k=key, v=value: client.set_model_version_tag(model, mv.version, k, v))
    return mv.version


def download_version(client, model: str, version: str, dest: Path, path: str = "") -> Path:
    """Download a version's artifacts (all, or one path below them) into dest; returns the local root."""
    import mlflow

    suffix = f"/{path}" if path else ""
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}{suffix}", dst_path=str(dest))
    return Path(local)


def load_sha_manifest(client, mv, workdir: Path) -> dict:
    """sha256.json of a version, checked against the version's `files.sha256` tag."""
    local = download_version(client, mv.name, mv.version, workdir / "sha", SHA256_MANIFEST)
    manifest = json.loads(local.read_text())
    expected = mv.tags.get(FILES_DIGEST_TAG)
    if manifest_digest(manifest) != expected:
        raise StageError(f"{mv.name} v{mv.version}: {SHA256_MANIFEST} does not match the version's "
                         f"{FILES_DIGEST_TAG} tag ({expected}); the file list was changed after publish")
    return manifest


def file_problems(client, mv) -> list[str]:
    """Download every file of a version and re-hash it against sha256.json (empty = all verified)."""
    with tempfile.TemporaryDirectory(prefix="wb-verify-") as tmp:
        try:
            manifest = load_sha_manifest(client, mv, Path(tmp))
        except StageError as exc:
            return [str(exc)]
        root = download_version(client, mv.name, mv.version, Path(tmp) / "all")
        return verify_files(root, manifest["files"])


def promotion_problems(client, mv) -> list[str]:
    """Every reason this version may not become champion (empty = promotable)."""
    tags, problems = mv.tags, []
    if tags.get(STATUS_TAG) != COMPLETE:
        problems.append(f"publish incomplete: {STATUS_TAG}={tags.get(STATUS_TAG, '<unset>')} "
                        "(an interrupted or failed publish; publish again)")
    if tags.get("gate.passed") != "true":
        problems.append(f"gate not passed: gate.passed={tags.get('gate.passed', '<unset>')}")
    if tags.get(APPROVAL_TAG) != "approved" or not tags.get(APPROVED_BY_TAG):
        problems.append(f"approval missing: needs tags {APPROVAL_TAG}=approved and {APPROVED_BY_TAG}=<reviewer> "
                        f"(now {APPROVAL_TAG}={tags.get(APPROVAL_TAG, '<unset>')}, "
                        f"{APPROVED_BY_TAG}={tags.get(APPROVED_BY_TAG, '<unset>')}); set them in the MLflow UI "
                        "or with `wb approve`")
    if tags.get(STATUS_TAG) == COMPLETE:
        bad = file_problems(client, mv)
        if bad:
            problems.append("files do not verify against sha256.json:\n      " + "\n      ".join(bad))
    return problems


def promote(client, model: str, version: str | None, alias: str | None, by: str | None, reason: str) -> str:
    mv = get_version(client, model, version, alias)
    problems = promotion_problems(client, mv)
    if problems:
        raise StageError(f"refusing to promote {model} v{mv.version} to @{CHAMPION}:\n  - " + "\n  - ".join(problems))
    current = alias_version(client, model, CHAMPION)
    if current == str(mv.version):
        print(f"promote: {model} v{mv.version} is already @{CHAMPION}")
        return mv.version
    who = actor(by)
    if current is not None:
        move_alias(client, model, PREVIOUS, current)
    move_alias(client, model, CHAMPION, mv.version)
    audit = {"action": "promote", "by": who, "at": _now(), "why": reason, "previous": current}
    retry("audit tag", lambda: client.set_model_version_tag(model, mv.version, "audit.promoted", json.dumps(audit)))
    retry("audit tag", lambda: client.set_registered_model_tag(model, "audit.last", json.dumps({**audit, "version": mv.version})))
    print(f"promote: {model} v{mv.version} is now @{CHAMPION}" + (f" (@{PREVIOUS} = v{current})" if current else ""))
    return mv.version


def rollback(client, model: str, by: str | None, reason: str) -> str:
    """Move @champion back to @previous (which must still verify), and drop @previous."""
    current = alias_version(client, model, CHAMPION)
    previous = alias_version(client, model, PREVIOUS)
    if previous is None:
        raise StageError(f"refusing to roll back {model}: no @{PREVIOUS} version (nothing was promoted over another)")
    mv = get_version(client, model, previous)
    bad = [] if mv.tags.get(STATUS_TAG) == COMPLETE else [f"{STATUS_TAG}={mv.tags.get(STATUS_TAG)}"]
    bad += file_problems(client, mv) if not bad else []
    if bad:
        raise StageError(f"refusing to roll back {model} to v{previous}: " + "; ".join(bad))
    move_alias(client, model, CHAMPION, previous)
    retry(f"delete @{PREVIOUS}", lambda: client.delete_registered_model_alias(model, PREVIOUS))
    audit = {"action": "rollback", "by": actor(by), "at": _now(), "why": reason, "from": current, "to": previous}
    if current is not None:
        retry("audit tag", lambda: client.set_model_version_tag(model, current, "audit.rolled_back", json.dumps(audit)))
    retry("audit tag", lambda: client.set_registered_model_tag(model, "audit.last", json.dumps(audit)))
    print(f"rollback: {model} @{CHAMPION} is v{previous} again (was v{current})")
    return previous

