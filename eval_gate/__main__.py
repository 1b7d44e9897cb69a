"""python -m eval_gate RECIPE [--force]: one verdict on every served artifact (exit 1 when it fails)."""
from __future__ import annotations

import sys

from workbench.stage_cli import stage_main


def main(argv: list[str] | None = None) -> int:
    from .gate import run

    return stage_main("eval_gate", "Evaluate every served artifact against the base and the champion; "
                      "write verdict.json and report.md.", run, argv)


if __name__ == "__main__":
    sys.exit(main())
