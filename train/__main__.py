"""Entry point: `accelerate launch train RECIPE`, `accelerate launch -m train RECIPE`, `python -m train RECIPE`."""
import sys

if not __package__:
    # Run as a directory (`accelerate launch train ...` runs `python train ...`): Python put train/ itself on
    # sys.path, where its modules would shadow real ones; put the directory that holds the package there instead.
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from train.stage import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
