"""What the demo runs that is no stage's business: the builders of the demo's raw corpus from the Python standard
library's own documentation (with their data: the safety mix, the PII canaries they plant, the golden set), and a
local production-shaped MLflow server (PostgreSQL + basic auth) for trying the review flow."""
