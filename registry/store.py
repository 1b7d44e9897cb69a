"""Talking to the MLflow registry: which store, which version, and alias moves that survive races."""
from __future__ import annotations

import os
import random
import sys
import time
from typing import Callable, TypeVar

from workbench.workspace import StageError

T = TypeVar("T")

# Version tags with a meaning in this project (docs/registry.md lists them all).
STATUS_TAG = "publish.status"          # incomplete -> complete; failed when an interrupted publish is found
COMPLETE = "complete"
APPROVAL_TAG = "approval"              # approved | rejected
APPROVED_BY_TAG = "approved_by"
FILES_DIGEST_TAG = "files.sha256"

# MLflow error codes worth a retry: another writer held the row, or the server/database hiccuped.
_TRANSIENT_CODES = {"RESOURCE_ALREADY_EXISTS", "TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "RESOURCE_CONFLICT",
                    "ABORTED", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED"}


def resolve_tracking_uri(tracking_uri: str | None = None, recipe_path: str | None = None) -> str:
    """--tracking-uri > MLFLOW_TRACKING_URI > the store of --recipe (its tracking_uri or embedded store)."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if recipe_path:
        from recipes import RecipeError, load_recipe
        from workbench.tracking import tracking_uri as recipe_uri

        try:
            return recipe_uri(load_recipe(recipe_path))
        except RecipeError as exc:
            raise StageError(str(exc)) from None
    raise StageError("no MLflow store given: pass --recipe RECIPE (its store), --tracking-uri URI, "
                     "or set MLFLOW_TRACKING_URI")


def client_for(uri: str):
    # one progress bar per file floods CI logs; our own lines say what is happening
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_transient(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or "database is locked" in str(exc)
    # connection resets and timeouts from the HTTP client
    return type(exc).__module__.startswith(("requests", "urllib3")) or isinstance(exc, (ConnectionError, TimeoutError))


def retry(what: str, fn: Callable[[], T], attempts: int = 6) -> T:
    """Run fn, retrying transient registry errors with jittered backoff; a permanent error raises at once."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(4.0, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random())
            print(f"registry: {what}: transient error ({type(exc).__name__}: {str(exc)[:120]}); "
                  f"retry {attempt}/{attempts - 1} in {delay:.1f}s", file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable")


def get_version(client, model: str, version: str | None = None, alias: str | None = None):
    """A model version by number or alias, or a StageError naming what does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(model, alias)
        return client.get_model_version(model, str(version))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            what = f"alias @{alias}" if alias is not None else f"version {version}"
            raise StageError(f"registered model {model!r} has no {what}") from None
        raise


def alias_version(client, model: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def move_alias(client, model: str, alias: str, version: str) -> None:
    """Point alias at version, retrying transient failures, then read it back to be sure it landed."""
    retry(f"set @{alias} -> v{version}", lambda: client.set_registered_model_alias(model, alias, str(version)))
    now = retry(f"read @{alias}", lambda: alias_version(client, model, alias))
    if str(now) != str(version):
        raise StageError(f"@{alias} of {model!r} is v{now} after setting it to v{version}: "
                         "another promotion raced this one; re-run")


def logged_model_id(mv) -> str | None:
    """The LoggedModel behind a registered version (the registry may record it only in `source`)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, version, alias)."""
    if not uri.startswith("models:/"):
        raise StageError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.split("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise StageError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
