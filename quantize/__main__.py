"""`python -m quantize RECIPE [--force]`: merge the trained adapter, then write every target the recipe lists."""
from __future__ import annotations

import sys

from workbench.stage_cli import stage_main


def _run(recipe, args):
    from .stage import run  # heavy imports (torch, transformers) only once the recipe is valid

    return run(recipe, args)


def main(argv: list[str] | None = None) -> int:
    return stage_main("quantize", "Merge the adapter; write GGUF (llama.cpp/Ollama) and AWQ (vLLM) targets.", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
