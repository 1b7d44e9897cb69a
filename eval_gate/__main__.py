"""`python -m eval_gate RECIPE [--force]`: the eval gate stage (eval_gate/stage.py); exit 1 when the verdict fails."""
import sys

from workbench.stage_cli import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("eval_gate", "Evaluate every served artifact against the base and the champion; "
                      "write verdict.json and report.md.", "eval_gate.stage:run", argv)


if __name__ == "__main__":
    sys.exit(main())
