"""Registry stage: publish gate-passed candidates to MLflow, approve/promote/roll back, pull verified artifacts
for serving, and a local PostgreSQL + basic-auth MLflow server (docs/registry.md)."""
