"""PII detectors: recall per type on the labelled set of tests/_pii_cases.py, precision on PII-free technical text,
the demo corpus and the golden set, the recipe's switches, and no name, address, national ID or secret left in
anything the stage writes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import _pii_cases as cases  # tests/_pii_cases.py (tests/ is on sys.path through its conftest)

from data_cleaning.pii import PII_TYPES, PLACEHOLDER_RE, PiiScrubber, without_salt
from recipes.sections.cleaning import BUILTIN_PII_TYPES, CleaningSection

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def scrubber() -> PiiScrubber:
    return PiiScrubber.for_rules(b"labelled-set", CleaningSection())


@pytest.fixture(scope="module")
def measured(scrubber) -> dict:
    return cases.evaluate(scrubber.scrub)


def test_recipe_types_are_the_detectors_types():
    assert tuple(BUILTIN_PII_TYPES) == PII_TYPES


def test_structured_types_recall_at_least_95_percent(measured):
    recall = measured["recall"]
    for t in ("NATIONAL_ID", "SECRET", "PHONE"):
        caught, total, share = recall[t]
        assert share >= 0.95, (t, caught, total, measured["missed"].get(t))
    assert recall["NATIONAL_ID"][1] >= 30 and recall["SECRET"][1] >= 20  # the set is not trivially small


def test_names_and_addresses_recall_floors(scrubber, measured):
    # measured: PERSON 89/94 = 0.947, ADDRESS 26/26 on the set the rules were written against; on the held-out
    # set (never used to tune them) PERSON 37/60 = 0.617, ADDRESS 11/12 = 0.917 (docs/data_cleaning.md)
    assert measured["recall"]["PERSON"][2] >= 0.92, measured["missed"].get("PERSON")
    assert measured["recall"]["ADDRESS"][2] >= 0.95, measured["missed"].get("ADDRESS")
    heldout = cases.evaluate(scrubber.scrub, cases.heldout_cases(), [])
    assert heldout["recall"]["PERSON"][2] >= 0.58, heldout["missed"].get("PERSON")
    assert heldout["recall"]["ADDRESS"][2] >= 0.9, heldout["missed"].get("ADDRESS")


def test_names_in_several_languages_and_positions(scrubber):
    texts = {
        "start": "Emily Carter here again about the refund.",  # no cue, both names on the lists
        "greeting": "Dear Jürgen Müller,\nthe ticket is closed.",
        "sign-off": "Thanks!\n\nMit freundlichen Grüßen\nAnneliese Becker",
        "french": "Bonjour, je m'appelle Étienne Lefèvre.",
        "russian": "Здравствуйте, меня зовут Анна Смирнова.",
        "field": "Name: Siobhan O'Connor\nOrder: 4411",
        "list": "Credits also go to Gustavo Niemeyer, Lars Svensson and Camille Dubois.",
    }
    for where, text in texts.items():
        out = scrubber.scrub(text)
        assert "<PERSON_" in out, (where, out)
        for word in re.findall(r"[^\W\d_]{4,}", text):
            if word[0].isupper() and word not in {"Dear", "Thanks", "Bonjour", "Name", "Order", "Credits", "Mit",
                                                   "Grüßen", "Здравствуйте", "here"}:
                assert word not in out, (where, word, out)


def test_invalid_check_digits_are_left_alone(scrubber):
    _, invalid = cases.national_id_cases()
    assert len(invalid) >= 15
    for text in invalid:
        assert scrubber.scrub(text) == text


def test_no_false_positives_on_technical_text(measured):
    # code, identifiers and class names (Thread, Path, Counter), versions, dates, hashes, stdlib docstrings
    assert measured["negatives"] >= 50
    assert measured["false_positives"] == []


def test_private_keys_and_slashed_aws_secrets_go_whole(scrubber):
    key = cases.PRIVATE_KEYS[0]
    out = scrubber.scrub(f"deploy key:\n{key}\nthanks")
    assert out.startswith("deploy key:\n-----BEGIN RSA PRIVATE KEY-----\n<SECRET_")
    assert out.endswith("\n-----END RSA PRIVATE KEY-----\nthanks")
    assert not any(line in out for line in cases.PEM_BODY.splitlines())
    out = scrubber.scrub(f"aws_secret_access_key = {cases.AWS_SECRET}")
    assert re.fullmatch(r"aws_secret_access_key = <SECRET_[0-9a-f]{4}>", out)
    # a value with an API key's own form stays an API_KEY, whatever the keyword says
    assert "<API_KEY_" in scrubber.scrub("api_key=Xq7vR2mK9pT4wL8nB3cZ6yH1jF5dS0gAe8UoNi4V")


def test_demo_corpus_and_golden_answers_are_not_scrubbed():
    """The stdlib corpus without its planted canaries: the only PII the new detectors find are the real names of
    module authors in the "who wrote" records; nothing in the golden set is touched."""
    from demo.stdlib_qa import build_records

    s = PiiScrubber.for_rules(b"demo", CleaningSection())
    # the detectors the stage had before: what they change (e-mail addresses in the docs) is not asked here
    before = PiiScrubber(b"demo", types=frozenset(PII_TYPES[:7]), phone_regions=())
    changed = []
    for rec in build_records(canaries=[]):
        texts = ([rec["text"]] if "text" in rec else [rec["prompt"], rec["completion"]] if "prompt" in rec
                 else [m["content"] for m in rec["messages"]])
        for text in texts:
            out = s.scrub(text)
            if out != before.scrub(text):
                changed.append(out)
    assert dict(s.counts) == {"EMAIL": before.counts["EMAIL"], "PERSON": 7}, dict(s.counts)
    assert len(changed) == 4 and all("module is credited to" in out for out in changed), changed

    golden = [json.loads(line) for line in (REPO / "demo" / "golden" / "stdlib.jsonl").read_text().splitlines()
              if line.strip()]
    answers = [g["prompt"] for g in golden]
    for g in golden:
        for e in g["expect"]:
            answers += [v for v in e.get("values", []) if isinstance(v, str)]
            answers += [e[k] for k in ("value", "pattern") if isinstance(e.get(k), str)]
    assert len(answers) >= 50
    for text in answers:
        assert s.scrub(text) == text


def test_pii_types_switch_each_type_and_user_patterns_still_run():
    examples = {"EMAIL": "mail marta.q@example-lab.org", "PHONE": "call 020 7946 0958",
                "NATIONAL_ID": "SSN 536-22-1587", "SECRET": "password = 'hunter2-Quokka!'",
                "PERSON": "My name is Emily Carter", "ADDRESS": "I live at 742 Evergreen Terrace, Springfield"}
    for t, text in examples.items():
        on = PiiScrubber(b"x").scrub(text)
        off = PiiScrubber(b"x", types=frozenset(PII_TYPES) - {t}, extra_patterns={"TICKET": r"\bT-\d{5}\b"})
        assert f"<{t}_" in on, (t, on)
        kept = off.scrub(text + " T-12345")
        assert f"<{t}_" not in kept and "<TICKET_" in kept, (t, kept)
    with pytest.raises(ValueError, match="unknown PII type"):
        CleaningSection(pii_types=["EMAIL", "NAME"])
    with pytest.raises(ValueError, match="not a region libphonenumber knows"):
        CleaningSection(pii_phone_regions=["UK"])
    # regions decide which national layouts are read: a French national number needs FR
    assert "<PHONE_" in PiiScrubber(b"x", phone_regions=("FR",)).scrub("appelez le 01 42 68 53 00")
    assert "<PHONE_" not in PiiScrubber(b"x", phone_regions=("US",)).scrub("appelez le 01 42 68 53 00")


def test_equal_values_equal_placeholders_salted_and_allowlist_wins():
    text = "My name is Emily Carter. Thanks, Emily Carter. SSN 536-22-1587 and again 536-22-1587."
    a = PiiScrubber(b"salt-a").scrub(text)
    people = re.findall(r"<PERSON_[0-9a-f]{4}>", a)
    ids = re.findall(r"<NATIONAL_ID_[0-9a-f]{4}>", a)
    assert len(people) == 2 and len(set(people)) == 1 and len(ids) == 2 and len(set(ids)) == 1
    b = PiiScrubber(b"salt-b").scrub(text)
    assert a != b and without_salt(a) == without_salt(b)
    allowed = PiiScrubber(b"salt-a", allowlist=("Emily Carter",)).scrub(text)
    assert "Emily Carter" in allowed and "<NATIONAL_ID_" in allowed
    assert all(PLACEHOLDER_RE.fullmatch(p) for p in people + ids)


def _tickets() -> tuple[list[dict], list[str]]:
    """Support-ticket conversations with every kind of new PII, and the values that must not survive. The few
    names the detectors miss on their own (test_names_and_addresses_recall_floors) are left out: this test is
    about the stage, that every split, the quarantine, the report and the logs get the scrubbed text."""
    scrub = PiiScrubber(b"probe").scrub
    rows, values, missed = [], [], 0
    for i, (text, labels) in enumerate(cases.positive_cases()):
        pieces = [p for lab in labels if lab.type in {"PERSON", "ADDRESS", "NATIONAL_ID", "SECRET"}
                  for p in lab.must_go]
        if any(cases.left_in(p, scrub(text)) for p in pieces):
            missed += 1
            continue
        if not pieces:
            continue
        values += pieces
        answer = f"Thanks, ticket {i} is logged and a colleague will follow up within {i % 5 + 1} working days."
        row = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}
        rows.append(row if i % 7 else {"text": f"Ticket {i}: {text}"})  # some become held-out text
    assert missed <= 6 and len(rows) > 150
    return rows, values


def test_split_of_records_with_names_does_not_depend_on_the_salt(tmp_path):
    from test_data_cleaning import run_core, write_jsonl

    rows, _ = _tickets()
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    _, kept_a, _ = run_core(tmp_path, raw, eval_fraction=0.3, salt=b"salt-a", near_dedup=False)
    _, kept_b, _ = run_core(tmp_path, raw, eval_fraction=0.3, salt=b"salt-b", near_dedup=False)
    assert {s for s, _ in kept_a} == {"train", "eval", "heldout_text"}
    assert [(s, without_salt(json.dumps(r))) for s, r in kept_a] == [(s, without_salt(json.dumps(r))) for s, r in kept_b]
    assert [r for _, r in kept_a] != [r for _, r in kept_b]


def test_no_name_address_id_or_secret_reaches_any_output(tmp_path, make_recipe, tiny_model_dir, run_cli):
    """Through the stage's command line: train, eval, heldout_text, quarantine, report and logs are clean, the
    report counts each type and reconciles."""
    rows, values = _tickets()
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    # a malformed record full of PII: its excerpt in quarantine.jsonl is scrubbed too
    lines.append('{"messages": [{"role": "user", "content": "My name is Emily Carter, SSN 536-22-1587, '
                 'I live at 742 Evergreen Terrace, password=Wint3r!sComing')
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"id": "g1", "prompt": "Which module parses JSON?", "expect": []}) + "\n")
    recipe = make_recipe(base_dir=tiny_model_dir, data={"raw": str(raw), "golden": str(golden), "build": None},
                         cleaning={"near_dedup": False})
    proc = run_cli("-m", "data_cleaning", str(recipe))
    assert proc.returncode == 0, proc.stderr
    clean = tmp_path / "runs" / "test" / "clean"
    report = json.loads((clean / "report.json").read_text())
    assert report["counts"]["reconciles"] and report["counts"]["quarantined"] == 1
    assert report["counts"]["splits"]["heldout_text"] > 0 and report["counts"]["splits"]["train"] > 0
    for t in ("PERSON", "ADDRESS", "NATIONAL_ID", "SECRET"):
        assert report["pii"][t] > 0, report["pii"]
    assert "| PERSON |" in (clean / "report.md").read_text()
    logs = proc.stdout + proc.stderr
    files = [(p, p.read_bytes().decode("utf-8", errors="replace")) for p in sorted((tmp_path / "runs").rglob("*"))
             if p.is_file() and p.name != "pii_salt"]
    for value in set(values) | {"Emily Carter", "536-22-1587", "742 Evergreen Terrace", "Wint3r!sComing"}:
        assert not cases.left_in(value, logs), value
        for path, data in files:
            assert not cases.left_in(value, data), (value, path)


def _token_classifier(out_dir: Path, tokenizer_dir: Path, labels: dict[int, str], always: int) -> Path:
    """A tiny BERT token classifier with the base's tokenizer whose head answers label `always` for every token."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=256, id2label=labels,
                     label2id={v: k for k, v in labels.items()}, pad_token_id=tok.pad_token_id or 0)
    model = BertForTokenClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[always] = 5.0
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_a_recipes_ner_model_adds_person_spans(tmp_path, smollm2_dir):
    """cleaning.pii_ner_model: a local transformers token-classification model adds its person spans to the
    rules' (a name on no list and after no cue); a path that is not a usable model is one clear error."""
    from data_cleaning.pii_names import load_ner
    from workbench.workspace import StageError

    text = "Zorblax Quimby asked about the invoice."
    assert PiiScrubber(b"x").scrub(text) == text  # the rules alone: on no name list, after no cue
    ner = load_ner(_token_classifier(tmp_path / "ner", smollm2_dir, {0: "O", 1: "B-PER", 2: "I-PER"}, always=1))
    s = PiiScrubber(b"x", ner=ner)
    out = s.scrub(text)
    assert "Zorblax" not in out and "Quimby" not in out and s.counts["PERSON"] >= 2, out
    # through the recipe: the model is loaded once for both scrubbers of a run
    cfg = CleaningSection(pii_ner_model=str(tmp_path / "ner"))
    assert "<PERSON_" in PiiScrubber.for_rules(b"x", cfg).scrub(text)

    no_person = _token_classifier(tmp_path / "loc", smollm2_dir, {0: "O", 1: "B-LOC"}, always=1)
    with pytest.raises(StageError, match="no person label"):
        load_ner(no_person)
    with pytest.raises(StageError, match="no such directory"):
        load_ner(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="neither a spaCy pipeline"):
        load_ner(tmp_path / "empty")
