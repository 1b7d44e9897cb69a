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


def _embedded_uri(recipe) -> str:
    return f"sqlite:///{embedded_store_dir(recipe) / 'mlflow.db'}"


def tracking_uri(recipe) -> str:
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or recipe.registry.tracking_uri
    if chosen:
        return chosen
    embedded_store_dir(recipe).mkdir(parents=True, exist_ok=True)
    return _embedded_uri(recipe)


def is_embedded(recipe) -> bool:
    # compared by value, not by "MLFLOW_TRACKING_URI is unset": mlflow.set_tracking_uri() exports that variable,
    # and a store mistaken for a server one got its artifacts in ./mlruns of whatever directory we ran in
    return tracking_uri(recipe) == _embedded_uri(recipe)


def setup_mlflow(recipe) -> str:
    """Point mlflow at the recipe's store and experiment; returns the experiment id. Imports mlflow lazily."""
    import mlflow

    uri = tracking_uri(recipe)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = recipe.registry.experiment or recipe.name
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    artifact_location = None
    if is_embedded(recipe):
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
