"""`python -m registry publish RECIPE [--force]`: the publish stage (registry/publish.py); also the registry
commands behind `wb promote|rollback|pull|ui|approve` (registry/cli.py)."""
import sys

from registry.cli import main

if __name__ == "__main__":
    sys.exit(main())
