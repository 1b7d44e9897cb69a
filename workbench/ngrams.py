"""Word n-grams: how the cleaning stage (decontamination) and the eval gate (its contamination check) decide that
two texts overlap. One definition, so that the two can never disagree about what a shared n-gram is."""
from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def word_ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """Every run of n words; a text shorter than n words is one gram of its own (short prompts still count)."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return set(zip(*(tokens[k:] for k in range(n))))
