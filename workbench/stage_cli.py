"""The shared command line of every stage: `python -m <stage> RECIPE [--force]`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from recipes import Recipe, RecipeError, load_recipe

from .workspace import StageError


def stage_main(prog: str, description: str, run: Callable[[Recipe, argparse.Namespace], int | None],
               argv: list[str] | None = None, extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse RECIPE/--force, load the recipe (exit 2 with every problem listed), run the stage.

    A StageError (bad input, missing upstream stage, ...) prints one clear line and exits 1; anything
    else is a bug and keeps its traceback.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("--force", action="store_true", help="re-run even if the output is up to date")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        rc = run(recipe, args)
    except StageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)
