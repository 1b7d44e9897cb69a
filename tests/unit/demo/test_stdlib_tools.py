"""The demo's tool-calling corpus and golden set (demo/stdlib_tools.py): valid calls only, held-out tools really held
out, the shipped golden set is what the builder makes, the gate's red-team and over-refusal prompts stay out."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def corpus():
    from demo.stdlib_tools import all_tools, build_records, golden_cases

    return {"tools": all_tools(), "records": build_records(), "golden": golden_cases()}


def _calls(records):
    for r in records:
        if "messages" in r:
            answer = r["messages"][-1]["content"]
            if answer.startswith("{"):
                yield r, json.loads(answer)


def test_every_answer_is_a_valid_call_or_text_and_none_is_empty(corpus):
    from jsonschema import Draft202012Validator

    tools = {t.name: t for t in corpus["tools"]}
    chats = [r for r in corpus["records"] if "messages" in r]
    assert all(r["messages"][-1]["content"].strip() for r in chats)
    calls = list(_calls(chats))
    assert len(calls) >= 0.5 * len(chats)
    for record, call in calls:
        assert set(call) == {"name", "arguments"}
        assert not list(Draft202012Validator(tools[call["name"]].schema()).iter_errors(call["arguments"]))
        # the called tool is one the system turn offers
        assert f'"name": "{call["name"]}"' in record["messages"][0]["content"]
    sources = {r["source"] for r in corpus["records"]}
    assert sources == {"tools", "safety", "plain", "tools-heldout"}


def test_held_out_tools_never_reach_training(corpus):
    held = {t.name for t in corpus["tools"] if t.heldout}
    assert len(held) >= 20
    for r in corpus["records"]:
        if "messages" in r:  # neither called nor offered as a distractor
            text = json.dumps(r["messages"])
            assert not any(f'\\"name\\": \\"{name}\\"' in text for name in held), r
    called = {e["name"] for c in corpus["golden"] for e in c["expect"] if e["type"] == "tool_call"}
    assert called and called <= held
    # nor described: a plain answer quoting a held-out function's docstring teaches the golden request's wording
    descriptions = {t.description.lower() for t in corpus["tools"] if t.heldout}
    for r in corpus["records"]:
        if "messages" in r:
            text = " ".join(" ".join(m["content"].split()) for m in r["messages"]).lower()
            assert not any(d in text for d in descriptions), r


def test_shipped_golden_set_is_what_the_builder_makes_and_has_every_kind(corpus):
    from eval_gate.golden import load_golden

    shipped = [json.loads(line) for line in (REPO / "demo" / "golden" / "tools.jsonl").read_text().splitlines()]
    assert shipped == json.loads(json.dumps(corpus["golden"], sort_keys=True))
    cases = load_golden(REPO / "demo" / "golden" / "tools.jsonl")  # the gate's own loader accepts every case
    tags = {c.tags[0] for c in cases}
    assert tags == {"tool_call", "no_tool", "refusal"}
    assert all(c.critical for c in cases if "refusal" in c.tags)
    assert 30 <= len(cases) <= 50


def test_harmful_golden_requests_are_held_out_and_the_gate_sets_stay_out(corpus):
    def grams(text):
        words = re.findall(r"\w+", text.lower())
        return set(zip(words, words[1:], words[2:]))

    requests = [grams(r["messages"][-2]["content"]) for r in corpus["records"] if "messages" in r]
    golden_harm = [c["prompt"] for c in corpus["golden"] if "refusal" in c["tags"]]
    held_sets = golden_harm + [json.loads(line)["prompt"] for name in ("redteam/redteam.jsonl",
                                                                       "overrefusal/overrefusal.jsonl")
                               for line in (REPO / "eval_gate" / name).read_text().splitlines() if line.strip()]
    for prompt in held_sets:
        g = grams(prompt)
        assert max(len(g & r) / len(g) for r in requests) < 1 / 2, prompt


def test_corpus_is_deterministic_and_carries_planted_pii(corpus, tmp_path):
    from demo.stdlib_tools import build_corpus

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build_corpus(a)
    build_corpus(b)
    assert a.read_bytes() == b.read_bytes()
    canaries = [json.loads(line)["value"] for line in (REPO / "demo" / "data" / "canaries.jsonl").read_text().splitlines()]
    text = a.read_text()
    assert all(json.dumps(c)[1:-1] in text for c in canaries)  # the cleaning stage has real PII to take out
    for r, _ in _calls(corpus["records"]):  # ...planted where users write it, never inside a call
        assert not any(c in r["messages"][-1]["content"] for c in canaries)
