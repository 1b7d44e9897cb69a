"""The shared command line of every stage: `python -m <package> RECIPE [--force]`.

Each stage package's `__main__.py` is the same three lines around `stage_main`, naming its `run(recipe, args)`
as "module:function" so that heavy imports (torch, transformers) happen only once the recipe is valid.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from recipes import Recipe, RecipeError, load_recipe

from .workspace import StageError

RunFunction = Callable[[Recipe, argparse.Namespace], "int | None"]


def stage_main(prog: str, description: str, run: str | RunFunction, argv: list[str] | None = None) -> int:
    """Parse RECIPE/--force, load the recipe (exit 2 with every problem listed), run the stage.

    A StageError (bad input, missing upstream stage, ...) prints one clear line and exits 1; anything
    else is a bug and keeps its traceback.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("--force", action="store_true", help="re-run even if the output is up to date")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        rc = _resolve(run)(recipe, args)
    except StageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


def _resolve(run: str | RunFunction) -> RunFunction:
    if callable(run):
        return run
    module, _, name = run.partition(":")
    return getattr(importlib.import_module(module), name)
