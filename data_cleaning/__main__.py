"""`python -m data_cleaning RECIPE [--force]`: the clean stage (data_cleaning/stage.py)."""
import sys

from workbench.stage_cli import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("data_cleaning", "Clean, deduplicate, PII-scrub and split the recipe's raw domain data.",
                      "data_cleaning.stage:run", argv)


if __name__ == "__main__":
    sys.exit(main())
