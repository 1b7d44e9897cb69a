"""Load a recipe YAML, validate it, and report every problem as FILE:LINE: path: message."""
from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from .schema import Recipe
from .sections.quantize import architecture_problem, read_model_config


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class RecipeError(Exception):
    """Every problem found in one recipe file; str() lists them one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line number."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out)
            out[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


def _duplicate_keys(node: yaml.Node, path: tuple = ()) -> list[tuple[tuple, int]]:
    found = []
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            if key_node.value in seen:
                found.append((path + (key_node.value,), key_node.start_mark.line + 1))
            seen.add(key_node.value)
            found += _duplicate_keys(value_node, path + (key_node.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, path + (i,))
    return found


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1


def _clean_loc(loc: tuple, lines: dict[tuple, int]) -> tuple:
    """Drop the parts pydantic adds to a loc that are not keys in the file (union tags such as the
    discriminator value 'gguf', validator names): keep a part if the file has that path, or if it is
    the last part (a missing field is not in the file)."""
    kept: tuple = ()
    for i, part in enumerate(loc):
        if kept + (part,) in lines or i == len(loc) - 1:
            kept += (part,)
    return kept


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _suggestion(loc: tuple) -> str:
    """'; did you mean X?' for a misspelt key, from the field names of the model at that place."""
    models: list[type[BaseModel]] = [Recipe]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        models = [m for model in models if part in model.model_fields
                  for m in _models_in(model.model_fields[part].annotation)]
    known = sorted({f for m in models for f in m.model_fields})
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; expected one of: {', '.join(known)}" if known else ""


def _cross_section_problems(data: dict, lines: dict[tuple, int], name: str) -> list[Problem]:
    """Rules that span sections, checked on the raw data so they are reported alongside field errors."""
    problems = []
    quantize = data.get("quantize")
    base = data.get("base_model")
    if isinstance(quantize, dict) and isinstance(base, dict):
        # an architecture the quantize stage cannot handle fails here, not after an hour of training
        targets = quantize.get("targets") or []
        kinds = {t.get("kind") for t in targets if isinstance(t, dict)}
        where = SimpleNamespace(path=base.get("path"), hub_id=base.get("hub_id"), revision=base.get("revision"))
        config = read_model_config(where)
        awq = next((t for t in targets if isinstance(t, dict) and t.get("kind") == "awq"), {})
        group = awq.get("group_size") if isinstance(awq.get("group_size"), int) else None
        problem = architecture_problem(config, needs_gguf=bool(kinds & {"gguf", "gguf_adapter"}),
                                       needs_awq="awq" in kinds, awq_group_size=group) if config else None
        if problem:
            problems.append(Problem(name, _nearest_line(lines, ("base_model",)), "base_model", problem))
    return problems


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate; raise RecipeError listing every problem with its line."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(name, 0, "recipe", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(name, 0, "recipe", f"cannot read: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        msg = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) or str(exc)
        raise RecipeError([Problem(name, line, "yaml", msg)]) from None
    if node is None or not isinstance(data, dict):
        raise RecipeError([Problem(name, 1, "recipe", "expected a mapping of sections (base_model, data, ...)")])
    lines = _line_map(node)
    problems = [Problem(name, line, ".".join(map(str, p)), "duplicate key") for p, line in _duplicate_keys(node)]
    problems += _cross_section_problems(data, lines, name)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]), lines)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _suggestion(loc)
            elif err["type"] == "missing":
                msg = "required section is missing" if len(loc) == 1 else "required field is missing"
            problems.append(Problem(name, _nearest_line(lines, loc), ".".join(map(str, loc)) or "recipe", msg))
        raise RecipeError(sorted(problems, key=lambda p: p.line)) from None
    if problems:
        raise RecipeError(problems)
    return recipe
