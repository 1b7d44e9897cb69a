"""Chat formats: the one place that knows chat templates, turn markers and stop tokens.

Every stage renders conversations with the chat template the train stage saved beside the adapter. What lies
around that template is known here: the ChatML template the workbench ships (with transformers'
`{% generation %}` markers, which assistant-only loss needs and other runtimes reject), the tokens that end an
assistant turn in the families we know, and whether another copy of a template renders the same prompts.
"""
from __future__ import annotations

import re
from pathlib import Path

from .workspace import StageError

CHATML_PATH = Path(__file__).with_name("chatml.jinja")  # shipped by the "*.jinja" package-data rule
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
# The token that ends an assistant turn, by family: ChatML (SmolLM2, Qwen), Llama 3, Gemma, Phi-3.
END_OF_TURN_TOKENS = (CHATML_END, "<|eot_id|>", "<end_of_turn>", "<|end|>")

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:generation|endgeneration)\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    return _GENERATION_TAG.search(template) is not None


def strip_generation_markers(template: str) -> str:
    """The template without `{% generation %}` / `{% endgeneration %}`: transformers' own Jinja extension (it marks
    the assistant tokens for assistant-only loss and renders to nothing), which llama.cpp and plain Jinja reject."""
    return _GENERATION_TAG.sub("", template)


def chatml_turn_overhead(count_tokens) -> int:
    """Tokens ChatML adds around the content of one turn (`count_tokens`: text -> number of tokens)."""
    return count_tokens(f"{CHATML_START}assistant\n{CHATML_END}\n")


def end_of_turn_token(vocab) -> str | None:
    """The first end-of-turn marker of a known family that the vocabulary has."""
    return next((t for t in END_OF_TURN_TOKENS if t in vocab), None)


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus the turn terminators the tokenizer knows: generation must stop at the end of the turn."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(i for i in ids if i is not None)


def resolve_chat_template(choice: str, tokenizer, assistant_only_loss: bool, recipe_dir: Path | None = None) -> str:
    """The template text for `train.chat_template` ('base' | 'chatml' | a .jinja path), checked against the tokenizer."""
    where = "train.chat_template"
    if choice == "chatml":
        missing = [t for t in (CHATML_START, CHATML_END) if t not in tokenizer.get_vocab()]
        if missing:
            raise StageError(
                f"{where}: 'chatml' needs the tokens {', '.join(missing)} in the base tokenizer's vocabulary; "
                "use 'base' or a .jinja template written for this model"
            )
        template, source = CHATML_PATH.read_text(encoding="utf-8"), "chatml"
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
        template, source = path.read_text(encoding="utf-8"), str(path)
    if assistant_only_loss and not has_generation_markers(template):
        raise StageError(
            f"{where}: {source} has no {{% generation %}} markers, so assistant-only loss cannot find the answers; "
            "use 'chatml', add the markers to the template, or set train.assistant_only_loss: false"
        )
    return template


# Conversations two templates must render alike: with and without a system turn, one and several turns.
PARITY_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Which module parses command-line arguments?"}],
    [{"role": "system", "content": "You are a Python standard library assistant."},
     {"role": "user", "content": "What does os.getcwd return?"},
     {"role": "assistant", "content": "The current working directory."},
     {"role": "user", "content": "And os.listdir?"}],
]


def rendering_difference(tokenizer, template: str | None, conversations: list[list[dict]]) -> str | None:
    """Why `template` renders other prompts than the tokenizer's own chat template (None when it renders the same).

    Compared on rendered text, so formatting differences inside the Jinja source do not matter, only what the
    model would see."""
    if not template:
        return "no chat template; a runtime would fall back to a guess"
    for messages in conversations:
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        try:
            got = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                tokenize=False)
        except Exception as exc:  # a template that does not even render is the finding itself
            return f"the chat template does not render: {exc}"
        if got != want:
            return f"renders {got[:80]!r}... where the adapter's template renders {want[:80]!r}..."
    return None
