"""The cleaning core: raw JSONL in, kept records out, every record accounted for.

Two streaming passes over disk, so memory stays flat as the corpus grows:

  pass 1  read -> schema -> normalize -> PII scrub -> token length -> decontaminate, in batches; survivors
          go to a scratch JSONL, their exact hash / MinHash signature / LSH bands to flat binary files
  dedup   exact duplicates, then near duplicates, found with numpy over those files
  pass 2  re-read the survivors, skip duplicates, split the rest (train / eval by record hash, PII placeholders'
          salted hashes left out; plain text to heldout_text)

Each record meets at most one dropping rule, in that order, so `records_in = quarantined + dropped
per rule + kept` holds to the record. The bench script drives this class directly.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from recipes.sections.cleaning import CleaningSection

from .decontam import GoldenIndex
from .dedup import Clusters, MinHasher, exact_duplicates, exact_key, near_duplicates
from .pii import PiiScrubber, without_salt
from .records import Quarantined, Record, looks_binary, normalize_record, parse_line, read_lines

DROP_RULES = ("too_short", "too_long", "contaminated", "exact_duplicate", "near_duplicate")
RULES = ("schema", "normalize", "pii", "length", "decontaminate", "exact_dedup", "near_dedup", "split")
SPLITS = ("train", "eval", "heldout_text")
EXCERPT_CHARS = 160
TOKEN_HIST_CAP = 1 << 16  # lengths above this land in the last bin

TokenCounter = Callable[[list[str]], list[int]]


class InputError(ValueError):
    """The raw input as a whole is unusable (missing, empty, not text); the message names the file."""


@dataclass
class CleanStats:
    records_in: int = 0
    blank_lines: int = 0
    quarantined: int = 0
    quarantine_reasons: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=lambda: Counter({r: 0 for r in DROP_RULES}))
    splits: Counter = field(default_factory=lambda: Counter({s: 0 for s in SPLITS}))
    normalized: int = 0
    ignored_fields: dict[str, int] = field(default_factory=dict)
    seconds: Counter = field(default_factory=Counter)  # per rule
    near_dup_pairs_checked: int = 0
    upsampled: Counter = field(default_factory=Counter)  # source -> extra train rows written (repeats)

    @property
    def kept(self) -> int:
        return sum(self.splits.values())

    def reconciles(self) -> bool:
        return self.records_in == self.quarantined + sum(self.dropped.values()) + self.kept

    def counts(self) -> dict:
        return {
            "records_in": self.records_in,
            "quarantined": self.quarantined,
            "dropped": dict(self.dropped),
            "kept": self.kept,
            "splits": dict(self.splits),
            "blank_lines": self.blank_lines,
            "reconciles": self.reconciles(),
            # repeats are rows, not records: `kept` and `splits` count each record once
            "upsampled": dict(self.upsampled),
        }


def check_input(path: Path) -> int:
    """The raw file's size; InputError naming the file when it is missing, empty or plainly not JSONL."""
    if path.is_dir():
        raise InputError(f"{path}: a directory, not a JSONL file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes, no records)")
    why = looks_binary(path)
    if why:
        raise InputError(f"{path}: {why}")
    return size


class _Timer:
    def __init__(self, seconds: Counter, rule: str):
        self.seconds, self.rule = seconds, rule

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.rule] += time.perf_counter() - self.t


class Cleaner:
    """One cleaning run. Call `ingest(path)`, then `deduplicate()`, then iterate `kept()`."""

    def __init__(self, cfg: CleaningSection, *, salt: bytes, work_dir: Path, eval_fraction: float,
                 count_tokens: TokenCounter, turn_overhead: int = 0, golden: list[str] | None = None,
                 quarantine: Callable[[dict], None] = lambda entry: None, batch_size: int = 512,
                 progress: bool = True):
        self.cfg = cfg
        self.eval_fraction = eval_fraction
        self.count_tokens, self.turn_overhead = count_tokens, turn_overhead
        self.quarantine_sink = quarantine
        self.batch_size, self.progress = batch_size, progress
        self.stats = CleanStats()
        self.scrubber = PiiScrubber.for_rules(salt, cfg)
        # excerpts of quarantined lines are scrubbed too, but not counted as PII found in records
        self.excerpt_scrubber = PiiScrubber.for_rules(salt, cfg, ner=self.scrubber.ner)
        self.golden = GoldenIndex(golden or [], cfg.decontam_ngram, cfg.decontam_threshold)
        self.hasher = MinHasher(cfg.near_dup_threshold, cfg.near_dup_num_perm, cfg.near_dup_shingle)
        self.work = Path(work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.records_path = self.work / "survivors.jsonl"
        self.keys_path = self.work / "exact.u64"
        self.sigs_path = self.work / "minhash.u32"
        self.bands_path = self.work / "bands.u64"
        self.survivors = 0
        self._lines: list[np.ndarray] = []  # line number of each survivor (8 bytes a record)
        self.token_hist = np.zeros(TOKEN_HIST_CAP + 1, dtype=np.int64)
        self.exact_clusters = Clusters()
        self.near_clusters = Clusters()
        self.contaminated_examples: list[dict] = []
        self._fate: np.ndarray | None = None
        self.source = ""

    # ---- pass 1 -------------------------------------------------------------------------------------
    def ingest(self, path: Path) -> None:
        path = Path(path)
        size = check_input(path)
        self.source = path.name
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        # The tokenizer (Rust, releases the GIL) counts batch k on a second thread while this one parses,
        # normalizes and scrubs batch k+1: the two slowest rules run on two cores.
        batch: list[Record] = []
        pending = None
        with open(self.records_path, "w", encoding="utf-8") as out, open(self.keys_path, "wb") as keys_f, \
                open(self.sigs_path, "wb") as sigs_f, open(self.bands_path, "wb") as bands_f, \
                open(path, "rb") as f, ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool, \
                tqdm(total=size, unit="B", unit_scale=True, desc="clean: read", disable=not self.progress,
                     mininterval=1.0) as bar:
            sinks = (out, keys_f, sigs_f, bands_f)
            for raw in read_lines(f, self.cfg.max_record_bytes):
                bar.update(raw.size)
                rec = self._first_rules(raw)
                if rec is not None:
                    batch.append(rec)
                    if len(batch) >= self.batch_size:
                        submitted = (batch, pool.submit(self._token_lengths, batch))
                        if pending is not None:
                            self._batch_rules(*pending, sinks)
                        pending, batch = submitted, []
            if batch:
                submitted = (batch, pool.submit(self._token_lengths, batch))
                if pending is not None:
                    self._batch_rules(*pending, sinks)
                pending = submitted
            if pending is not None:
                self._batch_rules(*pending, sinks)
        if self.stats.records_in == 0:
            raise InputError(f"{path}: no records (only {self.stats.blank_lines} blank lines)")

    def _first_rules(self, raw) -> Record | None:
        """schema, normalize, pii: per record. None when the line is blank or the record was quarantined."""
        st, secs = self.stats, self.stats.seconds
        if raw.data is not None and not raw.data.strip():
            st.blank_lines += 1
            return None
        st.records_in += 1
        try:
            with _Timer(secs, "schema"):
                rec = parse_line(raw, st.ignored_fields)
            if self.cfg.normalize:
                with _Timer(secs, "normalize"):
                    st.normalized += normalize_record(rec)
        except Quarantined as q:
            self._quarantine(raw, q)
            return None
        if self.cfg.pii:
            with _Timer(secs, "pii"):
                if rec.kind == "chat":
                    for m in rec.messages:
                        m["content"] = self.scrubber.scrub(m["content"])
                else:
                    rec.text = self.scrubber.scrub(rec.text)
        return rec

    def _quarantine(self, raw, q: Quarantined) -> None:
        self.stats.quarantined += 1
        self.stats.quarantine_reasons[q.reason] += 1
        head = raw.data if raw.data is not None else raw.head
        text = head[:4096].decode("utf-8", errors="replace")
        detail = q.detail
        if self.cfg.pii:
            # scrub the whole head before cutting it, so no value is left half-visible at the cut
            text, detail = self.excerpt_scrubber.scrub(text), self.excerpt_scrubber.scrub(detail)
        excerpt = "".join(c if c.isprintable() else "\ufffd" for c in text[:EXCERPT_CHARS])
        self.quarantine_sink({"file": self.source, "line": raw.number, "reason": q.reason, "detail": detail,
                              "bytes": raw.size, "excerpt": excerpt})

    def _token_lengths(self, batch: list[Record]) -> tuple[list[int], float]:
        """Tokens per record (contents plus the chat markers around each turn), and the seconds it took."""
        t = time.perf_counter()
        flat = [c for rec in batch for c in rec.contents()]
        lengths = self.count_tokens(flat)
        tokens, pos = [], 0
        for rec in batch:
            k = len(rec.contents())
            overhead = self.turn_overhead * k if rec.kind == "chat" else 0
            tokens.append(sum(lengths[pos:pos + k]) + overhead)
            pos += k
        return tokens, time.perf_counter() - t

    def _batch_rules(self, batch: list[Record], counted, sinks) -> None:
        """length, decontaminate, and the dedup fingerprints, for a batch (tokenizers and numpy like batches)."""
        out, keys_f, sigs_f, bands_f = sinks
        st, cfg, secs = self.stats, self.cfg, self.stats.seconds
        tokens, seconds = counted.result()
        secs["length"] += seconds
        survivors: list[tuple[Record, int]] = []
        for rec, n_tok in zip(batch, tokens):
            if cfg.min_tokens is not None and n_tok < cfg.min_tokens:
                st.dropped["too_short"] += 1
                continue
            if cfg.max_tokens is not None and n_tok > cfg.max_tokens:
                st.dropped["too_long"] += 1
                continue
            if cfg.decontaminate and len(self.golden):
                with _Timer(secs, "decontaminate"):
                    score, gid = self.golden.overlap("\n".join(rec.contents()))
                if score >= cfg.decontam_threshold:
                    st.dropped["contaminated"] += 1
                    if len(self.contaminated_examples) < 20:
                        self.contaminated_examples.append({"line": rec.line, "golden_index": gid,
                                                           "overlap": round(score, 3)})
                    continue
            survivors.append((rec, n_tok))
        if not survivors:
            return
        with _Timer(secs, "exact_dedup"):
            joined = [rec.joined() for rec, _ in survivors]
            keys = np.array([exact_key(rec.kind, j) for (rec, _), j in zip(survivors, joined)], dtype=np.uint64)
            keys_f.write(keys.tobytes())
        with _Timer(secs, "near_dedup"):
            if cfg.near_dedup:
                sigs = self.hasher.signatures(joined)
                sigs_f.write(sigs.tobytes())
                bands_f.write(self.hasher.band_hashes(sigs).tobytes())
        with _Timer(secs, "split"):
            for (rec, n_tok), text, key in zip(survivors, joined, keys.tolist()):
                row = rec.to_json()
                row["line"], row["tokens"] = rec.line, n_tok
                row["split_key"] = split_key(rec.kind, text, key)
                if rec.source is not None:
                    row["source"] = rec.source
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._lines.append(np.fromiter((rec.line for rec, _ in survivors), dtype=np.int64, count=len(survivors)))
        self.survivors += len(survivors)

    # ---- dedup --------------------------------------------------------------------------------------
    def deduplicate(self) -> None:
        n, st = self.survivors, self.stats
        fate = np.zeros(n, dtype=np.int8)  # 0 kept, 1 exact duplicate, 2 near duplicate
        keys = np.fromfile(self.keys_path, dtype=np.uint64) if n else np.zeros(0, dtype=np.uint64)
        if self.cfg.exact_dedup:
            with _Timer(st.seconds, "exact_dedup"):
                dup, self.exact_clusters = exact_duplicates(keys)
                fate[dup] = 1
        if self.cfg.near_dedup:
            with _Timer(st.seconds, "near_dedup"):
                dup, self.near_clusters, st.near_dup_pairs_checked = near_duplicates(
                    self.bands_path, self.sigs_path, n, self.hasher, fate == 0, self.cfg.near_dup_threshold)
                fate[dup] = 2
        st.dropped["exact_duplicate"] = int((fate == 1).sum())
        st.dropped["near_duplicate"] = int((fate == 2).sum())
        self._fate = fate

    def line_of(self, survivor_index: int) -> int:
        lines = np.concatenate(self._lines) if len(self._lines) != 1 else self._lines[0]
        self._lines = [lines]
        return int(lines[survivor_index])

    # ---- pass 2 -------------------------------------------------------------------------------------
    def kept(self) -> Iterator[tuple[str, dict]]:
        """(split, row) for every kept record, in input order. Rows are `{"messages": [...]}` or `{"text": str}`.

        A train record whose source is in `cleaning.upsample` is yielded that many times in a row (after
        deduplication and the split, so repeats never reach eval and never count as duplicates)."""
        if self._fate is None:
            raise RuntimeError("deduplicate() must run before kept()")
        from tqdm import tqdm

        fate, st = self._fate, self.stats
        want_excerpt = {i for c in (self.exact_clusters, self.near_clusters) for rep, members in c.top(10)
                        for i in (rep, *members[:2])}
        self.excerpts: dict[int, str] = {}
        with open(self.records_path, encoding="utf-8") as f:
            for i, line in enumerate(tqdm(f, total=self.survivors, desc="clean: write", unit="rec",
                                          disable=not self.progress, mininterval=1.0)):
                if i in want_excerpt:
                    row = json.loads(line)
                    self.excerpts[i] = _excerpt(row)
                if fate[i]:
                    continue
                t = time.perf_counter()
                row = json.loads(line)
                tokens = row.pop("tokens")
                row.pop("line")
                source = row.pop("source", None)
                key = row.pop("split_key")
                if "text" in row:
                    split = "heldout_text"
                else:
                    # the record's own hash decides: adding records never moves an existing one
                    u = float(key >> 11) / float(1 << 53)
                    split = "eval" if u < self.eval_fraction else "train"
                st.splits[split] += 1
                self.token_hist[min(tokens, TOKEN_HIST_CAP)] += 1
                st.seconds["split"] += time.perf_counter() - t
                repeat = self.cfg.upsample.get(source, 1) if split == "train" and source is not None else 1
                if repeat > 1:
                    st.upsampled[source] += repeat - 1
                for _ in range(repeat):
                    yield split, row

    def cluster_report(self, which: str, k: int = 10) -> list[dict]:
        clusters = self.exact_clusters if which == "exact" else self.near_clusters
        out = []
        for rep, members in clusters.top(k):
            out.append({
                "representative_line": self.line_of(rep),
                "size": 1 + len(members),
                "member_lines": [self.line_of(m) for m in members[:50]],
                "excerpt": self.excerpts.get(rep, ""),
                "member_excerpts": [self.excerpts[m] for m in members[:2] if m in self.excerpts],
            })
        return out

    def all_clusters(self, which: str) -> list[list]:
        """Every duplicate cluster as [kept line, [dropped lines]], in input order of the kept line."""
        clusters = self.exact_clusters if which == "exact" else self.near_clusters
        return [[self.line_of(rep), [self.line_of(m) for m in members]] for rep, members in sorted(clusters.members.items())]

    def cleanup(self) -> None:
        for p in (self.records_path, self.keys_path, self.sigs_path, self.bands_path):
            p.unlink(missing_ok=True)


def split_key(kind: str, joined: str, key: int) -> int:
    """The hash that puts a record in train or eval: its exact-dedup key, but with every PII placeholder's
    salted hash left out, so the split is the same in every workspace (the salt is random per workspace
    unless set): a record with an e-mail address in it must not change sides, and with it the whole
    training order, from one run of the same recipe to the next."""
    unsalted = without_salt(joined)
    return key if unsalted == joined else exact_key(kind, unsalted)


def _excerpt(row: dict) -> str:
    if "text" in row:
        text = row["text"]
    else:
        text = " | ".join(f"{m['role']}: {m['content']}" for m in row["messages"])
    text = " ".join(text.split())
    return text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else "")
