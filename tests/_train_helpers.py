"""Build the clean stage's output for train tests through the workspace API (no data_cleaning import)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

TOPICS = [
    ("os.path.join", "joins path components with the separator of the platform"),
    ("json.dumps", "serialises a Python object to a JSON string"),
    ("itertools.chain", "iterates over several iterables one after another"),
    ("collections.Counter", "counts hashable items and returns a dict subclass"),
    ("functools.lru_cache", "memoises a function with a least-recently-used cache"),
    ("pathlib.Path.read_text", "returns the decoded contents of a file as a string"),
    ("re.sub", "replaces the matches of a pattern in a string"),
    ("shutil.copyfile", "copies the contents of one file to another path"),
    ("math.isclose", "tells whether two floats are close within a tolerance"),
    ("datetime.timedelta", "represents a duration between two dates or times"),
    ("heapq.heappush", "pushes an item onto a heap keeping the heap invariant"),
    ("bisect.insort", "inserts an item into a sorted list keeping it sorted"),
]


def conversations(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        name, what = TOPICS[(i + offset) % len(TOPICS)]
        msgs = [{"role": "user", "content": f"What does {name} do?"},
                {"role": "assistant", "content": f"{name} {what}."}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You answer questions about the Python standard library."})
        out.append({"messages": msgs})
    return out


def heldout_texts(n: int) -> list[dict]:
    return [{"text": f"The function {name} {what}. It is part of the Python standard library."}
            for name, what in (TOPICS[i % len(TOPICS)] for i in range(n))]


def make_clean(recipe_path: Path, n_train: int = 24, n_eval: int = 6, n_heldout: int = 4,
               train_records: list[dict] | None = None) -> Path:
    """Write runs/<name>/clean/ with train/eval/heldout_text Arrow datasets and a manifest."""
    from datasets import Dataset

    from recipes import load_recipe
    from workbench.workspace import stage_output

    recipe = load_recipe(recipe_path)
    splits = {
        "train": train_records if train_records is not None else conversations(n_train),
        "eval": conversations(n_eval, offset=5),
        "heldout_text": heldout_texts(n_heldout),
    }
    with stage_output(recipe, "clean", force=True) as out:
        fingerprints = {}
        for split, records in splits.items():
            Dataset.from_list(records).save_to_disk(str(out.dir / split))
            fingerprints[split] = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
        out.results.update({"counts": {k: len(v) for k, v in splits.items()}, "fingerprints": fingerprints})
    return out.final_dir
