"""python -m data_cleaning RECIPE [--force]"""
from __future__ import annotations

import sys

from workbench.stage_cli import stage_main


def main(argv: list[str] | None = None) -> int:
    from .stage import run

    return stage_main("data_cleaning", "Clean, deduplicate, PII-scrub and split the recipe's raw domain data.",
                      run, argv)


if __name__ == "__main__":
    sys.exit(main())
