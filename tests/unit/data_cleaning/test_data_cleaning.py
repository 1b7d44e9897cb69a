"""data_cleaning: schema/quarantine, normalization, PII, dedup, decontamination, splits, reconciliation,
and the stdlib corpus builder, through the real command line where it matters."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_cleaning.core import Cleaner, InputError
from data_cleaning.pii import PLACEHOLDER_RE, PiiScrubber
from recipes.sections.cleaning import BUILTIN_PII_TYPES, CleaningSection

REPO = Path(__file__).resolve().parents[3]
CANARIES = [json.loads(line) for line in (REPO / "demo" / "data" / "canaries.jsonl").read_text().splitlines() if line.strip()]
PII_TYPES = {"EMAIL", "PHONE", "IPV4", "IPV6", "CREDIT_CARD", "IBAN", "API_KEY"}

LOREM = ("the heap queue algorithm keeps the smallest item at index zero so that pushing and popping stay "
         "logarithmic while the list itself remains an ordinary python list that callers may inspect").split()


def chat(q: str, a: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def long_answer(i: int, words: int = 60) -> str:
    """A distinct ~60-word answer per i (distinct enough that no two are near duplicates)."""
    return " ".join(f"{LOREM[(i * 7 + k * 3) % len(LOREM)]}{(i * 31 + k) % 97}" for k in range(words))


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def word_counter(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def run_core(tmp_path: Path, raw: Path, golden: list[str] | None = None, eval_fraction: float = 0.2,
             salt: bytes = b"test-salt", **rules):
    quarantined: list[dict] = []
    cleaner = Cleaner(CleaningSection(**rules), salt=salt, work_dir=tmp_path / f"work-{raw.stem}",
                      eval_fraction=eval_fraction, count_tokens=word_counter, golden=golden,
                      quarantine=quarantined.append, batch_size=16, progress=False)
    cleaner.ingest(raw)
    cleaner.deduplicate()
    kept = list(cleaner.kept())
    cleaner.cleanup()
    return cleaner, kept, quarantined


def all_bytes(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p, p.read_bytes()


# ---- PII -----------------------------------------------------------------------------------------------

def test_every_canary_type_is_replaced_by_a_salted_placeholder():
    assert {c["type"] for c in CANARIES} == PII_TYPES
    s = PiiScrubber(b"salt-a")
    for c in CANARIES:
        out = s.scrub(f"Before {c['value']} after.")
        assert c["value"] not in out, c
        assert re.fullmatch(rf"Before <{c['type']}_[0-9a-f]{{4}}> after\.", out), (c, out)
    assert set(s.counts) == PII_TYPES
    # equal values -> equal placeholders, within and across texts; another salt -> other placeholders
    email = CANARIES[0]["value"]
    twice = s.scrub(f"{email} and again {email}")
    first, second = PLACEHOLDER_RE.findall(twice)
    assert first == second == s.scrub(email)
    assert PiiScrubber(b"salt-b").scrub(email) != first
    assert PiiScrubber(b"salt-a").scrub("someone.else@example-lab.org") != first


def test_scrubber_leaves_code_and_numbers_alone_and_takes_user_patterns():
    s = PiiScrubber(b"x", extra_patterns={"EMPLOYEE_ID": r"\bEMP-\d{6}\b"}, allowlist=("127.0.0.1",))
    benign = ["x[::2]", "Python 3.11.7", "at 12:30:45", "2001-2023", "sha256 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
              "ThisIsAVeryLongCamelCaseIdentifierName", "9223372036854775807", "os.path.join(a, b)", "127.0.0.1",
              "1234 5678 9012 3456"]  # the last fails Luhn
    for text in benign:
        assert s.scrub(text) == text
    assert re.fullmatch(r"badge <EMPLOYEE_ID_[0-9a-f]{4}>", s.scrub("badge EMP-123456"))


# ---- core rules ----------------------------------------------------------------------------------------

def test_reconciles_and_removes_planted_exact_and_near_duplicates(tmp_path):
    rows = [chat(f"Question number {i} about heapq?", long_answer(i)) for i in range(40)]
    exact = [chat("Question number 3 about heapq?", long_answer(3)),  # identical
             chat("question   NUMBER 5 about heapq?", long_answer(5))]  # case/whitespace variant
    near = []
    for i in (10, 11, 12):
        words = long_answer(i).split()
        words[20] = "CHANGED"  # one word of 60: Jaccard of word 3-gram sets ~0.9
        near.append(chat(f"Question number {i} about heapq?", " ".join(words)))
    text_rows = [{"text": f"Held-out paragraph {i}: " + long_answer(100 + i)} for i in range(5)]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows + exact + near + text_rows)
    cleaner, kept, quarantined = run_core(tmp_path, raw)
    st = cleaner.stats
    assert st.records_in == 50 and st.reconciles()
    assert st.dropped["exact_duplicate"] == 2
    assert st.dropped["near_duplicate"] == 3
    assert st.kept == 45 and len(kept) == 45 and not quarantined
    # the earlier record is the representative, and the cluster says which lines it absorbed
    clusters = {c["representative_line"]: c["member_lines"] for c in cleaner.cluster_report("near")}
    assert clusters == {11: [43], 12: [44], 13: [45]}
    assert cleaner.all_clusters("exact") == [[4, [41]], [6, [42]]]
    assert {s for s, _ in kept} == {"train", "eval", "heldout_text"}
    assert sum(1 for s, _ in kept if s == "heldout_text") == 5


def test_switching_dedup_off_keeps_duplicates(tmp_path):
    rows = [chat("same question?", long_answer(1))] * 3
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    cleaner, kept, _ = run_core(tmp_path, raw, exact_dedup=False, near_dedup=False)
    assert len(kept) == 3 and cleaner.stats.reconciles()
    # duplicates share a hash, so they always share a split (no train/eval leakage even undeduplicated)
    assert len({s for s, _ in kept}) == 1


def test_normalization_and_token_length_limits(tmp_path):
    rows = [
        chat("Cafe\u0301 and\u00a0spaces\u200b?", "line one   \r\n\r\n\r\n\r\nline two\x07"),
        chat("short?", "ok"),
        chat("long?", " ".join(["word"] * 200)),
        chat("only a control char?", "\x00\x01"),
    ]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    cleaner, kept, quarantined = run_core(tmp_path, raw, min_tokens=3, max_tokens=100)
    assert kept[0][1]["messages"] == [{"role": "user", "content": "Caf\u00e9 and spaces?"},
                                      {"role": "assistant", "content": "line one\n\nline two"}]
    assert cleaner.stats.dropped["too_short"] == 1 and cleaner.stats.dropped["too_long"] == 1
    assert [(q["line"], q["reason"]) for q in quarantined] == [(4, "empty_content")]
    assert "after normalization" in quarantined[0]["detail"]
    assert cleaner.stats.reconciles()


def test_split_is_stable_when_records_are_added(tmp_path):
    base = [chat(f"Stable question {i}?", long_answer(i)) for i in range(60)]
    more = [chat(f"Another question {i}?", long_answer(500 + i)) for i in range(60)]
    raw_a = write_jsonl(tmp_path / "a.jsonl", base)
    raw_b = write_jsonl(tmp_path / "b.jsonl", more[:30] + base + more[30:])
    _, kept_a, _ = run_core(tmp_path, raw_a, eval_fraction=0.3)
    _, kept_b, _ = run_core(tmp_path, raw_b, eval_fraction=0.3)

    def split_of(kept):
        return {json.dumps(row, sort_keys=True): split for split, row in kept}

    a, b = split_of(kept_a), split_of(kept_b)
    assert {s for s in a.values()} == {"train", "eval"}
    assert all(b[key] == split for key, split in a.items())


def test_split_of_records_with_pii_does_not_depend_on_the_salt(tmp_path):
    # the salt is random per workspace: were the split keyed on the salted placeholders, records with PII
    # would change sides between two workspaces of one recipe, and the whole training order with them
    rows = [chat(f"Write to ops{i}@example-lab.org about job {i}?", long_answer(i)) for i in range(80)]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    _, kept_a, _ = run_core(tmp_path, raw, eval_fraction=0.3, salt=b"salt-a")
    _, kept_b, _ = run_core(tmp_path, raw, eval_fraction=0.3, salt=b"salt-b")

    def splits(kept):
        return [(split, row["messages"][1]["content"]) for split, row in kept]

    assert {s for s, _ in splits(kept_a)} == {"train", "eval"}
    assert splits(kept_a) == splits(kept_b)
    # ... while the placeholders themselves differ, as they should
    assert kept_a[0][1]["messages"][0]["content"] != kept_b[0][1]["messages"][0]["content"]
    assert "<EMAIL_" in kept_a[0][1]["messages"][0]["content"]


def test_upsample_repeats_train_records_of_a_source_and_never_eval(tmp_path):
    rows = [{**chat(f"mix question {i}?", long_answer(i)), "source": "mix"} for i in range(20)]
    rows += [{**chat(f"doc question {i}?", long_answer(100 + i)), "source": "doc"} for i in range(40)]
    rows += [chat(f"untagged question {i}?", long_answer(200 + i)) for i in range(10)]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    plain, plain_kept, _ = run_core(tmp_path, raw, eval_fraction=0.3)
    cleaner, kept, _ = run_core(tmp_path, raw, eval_fraction=0.3, upsample={"mix": 3})

    def question(row):
        return row["messages"][0]["content"]

    # records are counted once: the same splits as without upsampling, and the counts still reconcile
    assert cleaner.stats.splits == plain.stats.splits and cleaner.stats.reconciles()
    mix_train = [r for s, r in plain_kept if s == "train" and question(r).startswith("mix")]
    assert 0 < len(mix_train) < 20
    assert cleaner.stats.counts()["upsampled"] == {"mix": 2 * len(mix_train)}
    rows_by_split = {s: [question(r) for t, r in kept if t == s] for s in ("train", "eval")}
    assert len(rows_by_split["train"]) == plain.stats.splits["train"] + 2 * len(mix_train)
    for q in rows_by_split["train"]:
        assert rows_by_split["train"].count(q) == (3 if q.startswith("mix") else 1), q
    assert len(set(rows_by_split["eval"])) == len(rows_by_split["eval"]) == plain.stats.splits["eval"]
    with pytest.raises(ValueError, match="whole number of copies"):
        CleaningSection(upsample={"mix": 0})


def test_upsample_naming_a_source_no_record_has_is_a_warning(tmp_path, make_recipe, tiny_model_dir, golden_file,
                                                               run_cli):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{**chat(f"q {i}?", long_answer(i)), "source": "safety"}
                                                for i in range(10)])
    proc = run_cli("-m", "data_cleaning", str(stage_recipe(make_recipe, tiny_model_dir, raw, golden_file,
                                                            upsample={"saftey": 4})))
    assert proc.returncode == 0, proc.stderr
    assert "warning: cleaning.upsample names source 'saftey', which no kept train record" in proc.stderr
    manifest = json.loads((tmp_path / "runs" / "test" / "clean" / "manifest.json").read_text())
    assert set(manifest["results"]["counts"]["upsampled"]) == {"safety"}  # the demo recipe's own entry still works


def test_decontamination_drops_records_overlapping_the_golden_set(tmp_path):
    golden_prompt = "Which standard library module do I use to parse and write JSON in Python programs today?"
    rows = [
        chat(golden_prompt, "Use the json module."),  # the golden prompt verbatim
        chat("Tell me: " + golden_prompt.lower() + " Thanks!", "json."),  # embedded, case changed
        chat("How do I sort a list in place?", "Call list.sort()."),
        chat("Which module parses CSV?", "The csv module reads and writes CSV files."),
    ]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    golden = tmp_path / "golden.jsonl"
    write_jsonl(golden, [{"id": "g1", "prompt": golden_prompt, "expect": []}, {"id": "g2", "prompt": "What is heapq?"}])
    from data_cleaning.decontam import golden_texts

    cleaner, kept, _ = run_core(tmp_path, raw, golden=golden_texts(golden))
    assert cleaner.stats.dropped["contaminated"] == 2
    assert [ex["line"] for ex in cleaner.contaminated_examples] == [1, 2]
    assert len(kept) == 2 and cleaner.stats.reconciles()
    # switched off: everything stays
    cleaner, kept, _ = run_core(tmp_path, raw, golden=golden_texts(golden), decontaminate=False)
    assert cleaner.stats.dropped["contaminated"] == 0 and len(kept) == 4


def test_empty_or_blank_or_compressed_input_is_one_clear_error(tmp_path):
    cfg = dict(salt=b"s", eval_fraction=0.1, count_tokens=word_counter, progress=False)
    for name, content, expected in (("empty.jsonl", b"", "empty"), ("blank.jsonl", b"\n\n  \n", "no records"),
                                    ("data.jsonl", b"\x1f\x8b\x08\x00rest", "gzip")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError, match=re.escape(str(path)) + ".*" + expected):
            Cleaner(CleaningSection(), work_dir=tmp_path / "w", **cfg).ingest(path)


# ---- the stage through its command line ---------------------------------------------------------------

@pytest.fixture
def golden_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "golden.jsonl", [
        {"id": "g1", "prompt": "Which standard library module do I use to parse and write JSON in Python?", "expect": []},
    ])


def stage_recipe(make_recipe, tiny_model_dir, raw: Path, golden: Path, **cleaning) -> Path:
    return make_recipe(base_dir=tiny_model_dir, data={"raw": str(raw), "golden": str(golden), "build": None},
                       cleaning=cleaning)


def test_malformed_input_is_quarantined_with_line_numbers(tmp_path, make_recipe, tiny_model_dir, golden_file, run_cli):
    good = [chat(f"Good question {i}?", long_answer(i, 20)) for i in range(6)]
    canary = next(c["value"] for c in CANARIES if c["type"] == "EMAIL")
    lines = [
        json.dumps(good[0]),
        '{"messages": [{"role": "user", "content": "broken',  # 2: broken JSON
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),  # 3
        json.dumps(good[1]),
        "",  # 5: blank, not a record
        json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),  # 6
        json.dumps({"prompt": f"mail {canary}", "completion": ""}),  # 7: empty completion, PII in the excerpt
        json.dumps([1, 2, 3]),  # 8
        json.dumps({"text": 42}),  # 9
        json.dumps({"messages": [], "text": "both"}),  # 10
        json.dumps(good[2]),
    ]
    raw = tmp_path / "raw.jsonl"
    with open(raw, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b"\xff\xfe\x00garbage\x80\x81 binary\n")  # 12: not UTF-8
        f.write(json.dumps(good[3]).encode() + b"\n")
        # 14: a 50 MB record, never held in memory whole
        f.write(b'{"text": "' + b"x" * (50 * 1024 * 1024) + b'"}\n')
        f.write(json.dumps(good[4]).encode() + b"\n")
        f.write(json.dumps(good[5]).encode())  # 16: last line without a newline
    recipe = stage_recipe(make_recipe, tiny_model_dir, raw, golden_file)
    proc = run_cli("-m", "data_cleaning", str(recipe))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    clean = tmp_path / "runs" / "test" / "clean"
    entries = [json.loads(line) for line in (clean / "quarantine.jsonl").read_text().splitlines()]
    got = {e["line"]: e["reason"] for e in entries}
    assert got == {2: "invalid_json", 3: "bad_role", 6: "bad_order", 7: "empty_content", 8: "not_an_object",
                   9: "bad_type", 10: "ambiguous_shape", 12: "invalid_utf8", 14: "oversized"}
    assert all(e["file"] == "raw.jsonl" for e in entries)
    assert next(e for e in entries if e["line"] == 14)["bytes"] > 50 * 1024 * 1024
    report = json.loads((clean / "report.json").read_text())
    c = report["counts"]
    assert (c["records_in"], c["quarantined"], c["kept"], c["blank_lines"]) == (15, 9, 6, 1)
    assert c["reconciles"]
    for path, data in all_bytes(clean):
        assert canary.encode() not in data, path
    assert canary not in proc.stdout + proc.stderr


def test_empty_raw_file_is_one_clear_error(tmp_path, make_recipe, tiny_model_dir, golden_file, run_cli):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b"")
    proc = run_cli("-m", "data_cleaning", str(stage_recipe(make_recipe, tiny_model_dir, raw, golden_file)))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip() and "error" in line]
    assert len(err) == 1 and str(raw) in err[0] and "empty" in err[0]
    assert not (tmp_path / "runs" / "test" / "clean").exists()
    # a missing golden set is named too (decontamination cannot run without it)
    raw.write_text(json.dumps(chat("q?", "a")) + "\n")
    missing = tmp_path / "no-golden.jsonl"
    proc = run_cli("-m", "data_cleaning", str(stage_recipe(make_recipe, tiny_model_dir, raw, missing)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"data.golden {missing}: no such file" in proc.stderr


def test_pydoc_corpus_is_deterministic_and_goes_through_the_stage(tmp_path, make_recipe, tiny_model_dir, run_cli):
    """The demo path: the stage builds the stdlib corpus itself, cleans it, and every planted canary is gone
    from every file it wrote and from its logs; the report reconciles to the record."""
    by_cli = tmp_path / "cli.jsonl"
    proc = run_cli("-m", "demo.stdlib_qa", "--out", str(by_cli), check=True,
                   env={"PYTHONHASHSEED": "123"})
    assert "records" in proc.stdout
    raw_text = by_cli.read_text()
    for c in CANARIES:
        assert c["value"] in raw_text, f"canary {c} was not planted"
    records = [json.loads(line) for line in raw_text.splitlines()]
    assert len(records) > 2000
    assert {("messages" in r, "prompt" in r, "text" in r) for r in records} == {
        (True, False, False), (False, True, False), (False, False, True)}
    assert "bob@redivi.com" in raw_text  # real metadata e-mails are part of the dirt

    raw = tmp_path / "built" / "stdlib.jsonl"  # does not exist: the stage builds it
    golden = REPO / "demo" / "golden" / "stdlib.jsonl"
    if not golden.is_file():
        golden = write_jsonl(tmp_path / "golden.jsonl", [{"prompt": "What does `heapq.heappush` do?"}])
    recipe = make_recipe(base_dir=tiny_model_dir, data={"raw": str(raw), "golden": str(golden), "build": "pydoc"},
                         cleaning={"max_tokens": 512})
    proc = run_cli("-m", "data_cleaning", str(recipe), env={"PYTHONHASHSEED": "7"})
    assert proc.returncode == 0, proc.stderr
    assert raw.read_bytes() == by_cli.read_bytes()  # same Python version -> same corpus

    clean = tmp_path / "runs" / "test" / "clean"
    manifest = json.loads((clean / "manifest.json").read_text())
    counts = manifest["results"]["counts"]
    assert counts["records_in"] == len(records)
    assert counts["records_in"] == counts["quarantined"] + sum(counts["dropped"].values()) + counts["kept"]
    assert counts["quarantined"] > 0 and counts["dropped"]["exact_duplicate"] > 0 and counts["dropped"]["near_duplicate"] > 0
    assert set(manifest["results"]["fingerprints"]) == {"train", "eval", "heldout_text"}
    report = json.loads((clean / "report.json").read_text())
    # every canary type was found; the report lists every type it looked for, found or not
    assert {t for t, n in report["pii"].items() if n} >= PII_TYPES
    assert list(report["pii"]) == list(BUILTIN_PII_TYPES)
    # every dropped duplicate is traceable to the record kept in its place
    for kind in ("exact", "near"):
        dropped_lines = [line for _, members in report["duplicate_clusters"][kind] for line in members]
        assert len(dropped_lines) == counts["dropped"][f"{kind}_duplicate"]
    quarantine = (clean / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == counts["quarantined"]
    for name in ("report.md", "token_lengths.png", "quarantine.jsonl"):
        assert (clean / name).stat().st_size > 0

    from datasets import load_from_disk

    train = load_from_disk(str(clean / "train"))
    assert train.column_names == ["messages"]
    assert len(train) == counts["splits"]["train"] + sum(counts["upsampled"].values())  # the demo upsamples safety
    assert counts["upsampled"].keys() <= {"safety"}
    assert train.features["messages"].feature["role"].dtype == "string"
    heldout = load_from_disk(str(clean / "heldout_text"))
    assert heldout.column_names == ["text"] and len(heldout) == counts["splits"]["heldout_text"]
    assert any(PLACEHOLDER_RE.search(m["content"]) for row in train["messages"] for m in row)
    # the safety mix survives cleaning (no near-duplicate removal eats the three refusals of a request)
    from demo.stdlib_qa import safety_records

    safety = {tuple(m["content"] for m in conv) for conv in safety_records()}
    eval_rows = load_from_disk(str(clean / "eval"))["messages"]
    kept = {tuple(m["content"] for m in row if m["role"] != "system") for row in list(train["messages"]) + list(eval_rows)}
    assert len(safety) >= 100 and len(safety & kept) >= 0.95 * len(safety)

    logs = proc.stdout + proc.stderr
    for c in CANARIES + [{"value": "bob@redivi.com"}]:
        assert c["value"] not in logs
        for path, data in all_bytes(tmp_path / "runs"):
            assert c["value"].encode() not in data, (c, path)

    # up to date: a second run does nothing; --force re-runs to the same datasets
    again = run_cli("-m", "data_cleaning", str(recipe), check=True)
    assert "up to date" in again.stdout
    run_cli("-m", "data_cleaning", str(recipe), "--force", check=True)
    assert json.loads((clean / "manifest.json").read_text())["results"]["fingerprints"] == manifest["results"]["fingerprints"]
