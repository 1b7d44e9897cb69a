"""`accelerate launch train RECIPE` (or `python -m train RECIPE`): the train stage (train/stage.py)."""
import sys

if not __package__:
    # `accelerate launch train RECIPE` runs this directory as a script, with train/ itself first on sys.path,
    # where its modules would shadow real ones: put the directory that holds the package there instead.
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from workbench.stage_cli import stage_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return stage_main("train", "LoRA / QLoRA / DoRA fine-tuning of the recipe's base on the cleaned data",
                      "train.stage:run", argv)


if __name__ == "__main__":
    sys.exit(main())
