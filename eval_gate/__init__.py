"""The eval gate stage: `python -m eval_gate RECIPE` (see docs/eval_gate.md)."""
