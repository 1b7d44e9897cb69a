"""The publish stage and the registry commands: publish gate-passed candidates to MLflow, approve/promote/roll back,
pull verified artifacts for serving (docs/registry.md)."""
