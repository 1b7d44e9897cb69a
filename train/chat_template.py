"""The chat template used in training. It is saved with the adapter and every later stage uses it.

Assistant-only loss needs `{% generation %}...{% endgeneration %}` markers around what the model must learn
to say (the answer and its end-of-turn token); most base templates lack them, so `chatml` ships one that
renders exactly like SmolLM2's own template (including its default system prompt) with the markers added.
"""
from __future__ import annotations

import re
from pathlib import Path

from workbench.workspace import StageError

CHATML_PATH = Path(__file__).with_name("chatml.jinja")  # next to the modules: shipped by the "*.jinja" package-data rule
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    return _GENERATION.search(template) is not None


def resolve_chat_template(choice: str, tokenizer, assistant_only_loss: bool, recipe_dir: Path | None = None) -> str:
    """The template text for `train.chat_template` ('base' | 'chatml' | a .jinja path), checked against the tokenizer."""
    where = "train.chat_template"
    if choice == "chatml":
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise StageError(
                f"{where}: 'chatml' needs the tokens {', '.join(missing)} in the base tokenizer's vocabulary; "
                "use 'base' or a .jinja template written for this model"
            )
        template = CHATML_PATH.read_text(encoding="utf-8")
        source = "chatml"
    elif choice == "base":
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise StageError(f"{where}: 'base' but the base tokenizer has no chat template; use 'chatml' or a .jinja path")
        source = "the base's template"
    else:
        path = Path(choice)
        if not path.is_absolute() and recipe_dir is not None and not path.exists():
            path = recipe_dir / path
        if not path.is_file():
            raise StageError(f"{where}: template file {path} does not exist")
        template = path.read_text(encoding="utf-8")
        source = str(path)
    if assistant_only_loss and not has_generation_markers(template):
        raise StageError(
            f"{where}: {source} has no {{% generation %}} markers, so assistant-only loss cannot find the answers; "
            "use 'chatml', add the markers to the template, or set train.assistant_only_loss: false"
        )
    return template
