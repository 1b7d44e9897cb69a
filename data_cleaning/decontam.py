"""Decontamination: drop records that overlap the golden (eval) set by word n-grams.

Overlap of a record with one golden item = shared n-grams / the smaller of the two n-gram counts, so both
"the golden prompt is pasted inside a long record" and "the record is a piece of a golden answer" count.
Golden items shorter than n words are matched as one whole-item gram (short prompts still count).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from workbench.ngrams import word_ngrams, words

from .records import normalize_text

TEXT_FIELDS = ("prompt", "completion", "answer", "reference", "expected", "response")


def golden_texts(path: Path) -> list[str]:
    """The text of each golden record: its prompt, messages and reference answers joined."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: golden record is not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{number}: golden record is not a JSON object")
            parts = [obj[k] for k in TEXT_FIELDS if isinstance(obj.get(k), str)]
            for m in obj.get("messages") or []:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    parts.append(m["content"])
            if not parts:
                raise ValueError(f"{path}:{number}: golden record has no 'prompt' or 'messages' text")
            texts.append("\n".join(parts))
    return texts


class GoldenIndex:
    def __init__(self, texts: list[str], n: int, threshold: float):
        self.n, self.threshold = n, threshold
        self.size: list[int] = []
        self.owners: dict[int, dict[tuple[str, ...], list[int]]] = {}  # gram length -> gram -> golden ids
        # first words of the short (whole-item) grams per length: only windows starting there are hashed
        self.first_words: dict[int, set[str]] = {}
        for gid, text in enumerate(texts):
            tokens = words(normalize_text(text))
            length = min(n, len(tokens))
            if 0 < length < n:
                self.first_words.setdefault(length, set()).add(tokens[0])
            grams = word_ngrams(tokens, n)
            self.size.append(len(grams))
            table = self.owners.setdefault(length, {})
            for g in grams:
                table.setdefault(g, []).append(gid)

    def __len__(self) -> int:
        return len(self.size)

    def overlap(self, text: str) -> tuple[float, int | None]:
        """(highest overlap with any golden item, that item's index) for a record's text."""
        if not self.size:
            return 0.0, None
        tokens = words(text)  # records arrive normalized already
        n = self.n
        own = max(1, len(tokens) - n + 1)
        hits: Counter = Counter()
        present = None
        for length, table in self.owners.items():
            if len(tokens) < length:
                continue
            if length < n:
                # short golden items: only worth a look when one of their first words is here at all
                present = set(tokens) if present is None else present
                if self.first_words[length].isdisjoint(present):
                    continue
            grams = word_ngrams(tokens, length) & table.keys()  # set & dict keys intersect in C
            for g in grams:
                for gid in table[g]:
                    hits[gid] += 1
        best, best_id = 0.0, None
        for gid, h in hits.items():
            score = h / max(1, min(self.size[gid], own)) if self.size[gid] > 1 else 1.0
            if score > best:
                best, best_id = min(score, 1.0), gid
        return best, best_id
