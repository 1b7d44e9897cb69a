"""The stdlib Q&A corpus builder (demo/stdlib_qa.py): the safety mix keeps the gate's red-team prompts out, the
questions are asked both ways round, answers say what a function does before its signature."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_safety_mix_keeps_the_gates_red_team_prompts_held_out():
    """Training on the red-team prompts would make the gate's refusal check measure memory, not behaviour:
    no red-team prompt may share a third of its word 3-grams with any request of the safety mix."""
    from demo.stdlib_qa import safety_records

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return set(zip(words, words[1:], words[2:]))

    asks = [grams(conv[0]["content"]) for conv in safety_records()]
    redteam = [json.loads(line) for line in (REPO / "eval_gate" / "redteam" / "redteam.jsonl").read_text().splitlines()
               if line.strip()]
    assert len(redteam) >= 20 and asks
    for case in redteam:
        g = grams(case["prompt"])
        worst = max(len(g & a) / len(g) for a in asks)
        assert worst < 1 / 3, (case["id"], worst)


def test_which_module_questions_name_the_module_and_harmless_wrapped_ones_are_answered():
    """The corpus asks the other way round too ("which module provides X?"), and one harmless question per
    module comes in a jailbreak-style framing and is answered, not refused: refusing must follow the request."""
    from demo.stdlib_qa import (ASK_ADVERSARIAL, ASK_HARMFUL, WHICH_PER_MODULE, module_entries,
                                             which_module_records)
    from eval_gate.golden import is_refusal

    for name in ("json", "collections", "heapq"):
        convs = list(which_module_records(name, list(module_entries(name))))
        assert len(convs) == WHICH_PER_MODULE + 2, name  # names asked plainly, one wrapped, the module's purpose
        for user, assistant in convs:
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert f"`{name}`" in assistant["content"] and not is_refusal(assistant["content"])
        prefixes = [w.split("{")[0] for w in ASK_HARMFUL + ASK_ADVERSARIAL if w.split("{")[0]]
        wrapped = [u["content"] for u, _ in convs
                   if any(u["content"].startswith(p) for p in prefixes) or u["content"].startswith("Tell me")]
        assert len(wrapped) == 1, (name, [u["content"] for u, _ in convs])
    assert list(which_module_records("json", list(module_entries("json")))) == \
        list(which_module_records("json", list(module_entries("json"))))  # deterministic


def test_what_does_answers_say_what_it_does_before_the_signature():
    """Answers that opened with the signature taught the model to open every answer with one it had to make
    up; the docstring's first paragraph comes first, the signature after it."""
    from demo.stdlib_qa import module_entries, qa_records, summary

    entries = {e.qualname: e for e in module_entries("json")}
    for qualname in ("json.dumps", "json.JSONDecoder"):
        entry = entries[qualname]
        user, answer = next(qa_records(entry))
        about = summary(entry.doc)
        assert user["role"] == "user" and about
        assert about in answer["content"] and qualname in answer["content"]
        assert answer["content"].index(about) < answer["content"].index(f"{qualname}(")
        assert not answer["content"].startswith("`") or answer["content"].startswith(f"`{qualname}` is a class.")
