"""Where MLflow lives for a recipe. One rule for every stage:

MLFLOW_TRACKING_URI in the environment > registry.tracking_uri in the recipe > the embedded store,
a SQLite database and artifact directory under the workspace root (`<workspace>/mlflow/`), shared by
every recipe that uses that workspace. Credentials for a server come from the environment
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), never from the recipe.
"""
from __future__ import annotations

import os
from pathlib import Path


def embedded_store_dir(recipe) -> Path:
    return Path(recipe.workspace).resolve() / "mlflow"


def tracking_uri(recipe) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if recipe.registry.tracking_uri:
        return recipe.registry.tracking_uri
    root = embedded_store_dir(recipe)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def is_embedded(recipe) -> bool:
    return tracking_uri(recipe).startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI") \
        and not recipe.registry.tracking_uri


def setup_mlflow(recipe) -> str:
    """Point mlflow at the recipe's store and experiment; returns the experiment id. Imports mlflow lazily."""
    import mlflow

    uri = tracking_uri(recipe)
    # before set_tracking_uri: it exports MLFLOW_TRACKING_URI, after which every store looks like a server
    # store and a new experiment would put its artifacts in ./mlruns of whatever directory we run in
    embedded = is_embedded(recipe)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = recipe.registry.experiment or recipe.name
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    artifact_location = None
    if embedded:
        # absolute file URI: the store stays valid whatever directory later commands run from
        artifact_location = (embedded_store_dir(recipe) / "artifacts").as_uri()
    try:
        exp_id = mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        # another process created it between our lookup and create
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
