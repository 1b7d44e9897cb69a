"""Throughput and memory of the data_cleaning core on a synthetic corpus.

    python bench/clean_throughput.py                  # 100k records, then 400k for the memory check
    python bench/clean_throughput.py --sizes 100000   # one size only

For each size a fresh child process generates the corpus (not timed: chat, prompt/completion and text
records, with planted exact duplicates, near duplicates, the PII canaries and names, addresses, national IDs
and keyword-context secrets), then runs the stage's cleaning core and writes the Arrow splits as the stage
does. It prints records/s for the whole run and per rule, what the rules found against what was planted, and
the child's peak RSS: streaming means the 400k peak stays close to the 100k one. Token lengths use the demo
recipe's base tokenizer (`--tokenizer DIR` to pick another, `--no-tokenizer` to count words instead).

The first size is also run with only the PII detectors the stage had before names, addresses, national IDs,
secrets and national phone layouts (`--pii regex`), and the ratio of the two records/s is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXACT_DUP_SHARE = 0.05
NEAR_DUP_SHARE = 0.05
PII_SHARE = 0.02
# PII that the canaries do not cover, planted like them: what the name, address, ID and secret detectors find
PLANTED_PII = ["My name is Marta Quillfeather", "Best regards,\nJürgen Müller", "SSN 536-22-1587",
               "I live at 742 Evergreen Terrace, Springfield, IL 62704", "Steuer-ID 36574261809",
               "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "password = 'hunter2-Quokka!'",
               "ship it to Hauptstraße 5, 10115 Berlin", "call 020 7946 0958"]
# the detectors of PII types the stage had before the ones above (and no national phone layouts)
REGEX_PII = {"pii_types": ["EMAIL", "PHONE", "IPV4", "IPV6", "CREDIT_CARD", "IBAN", "API_KEY"],
             "pii_phone_regions": []}


def doc_words() -> list[str]:
    """The word stream of the stdlib docs corpus (canaries left out): realistic words at realistic frequencies."""
    from demo.stdlib_qa import build_records

    words = []
    for rec in build_records(canaries=[]):
        texts = [rec["text"]] if "text" in rec else ([rec["prompt"], rec["completion"]] if "prompt" in rec
                                                     else [m["content"] for m in rec["messages"]])
        for t in texts:
            words.extend(t.split())
    return words


def make_corpus(path: Path, n: int, seed: int = 0) -> dict:
    """Write n synthetic raw records; returns what was planted."""
    rng = random.Random(seed)
    vocab = doc_words()
    canaries = [json.loads(line) for line in (REPO / "demo" / "data" / "canaries.jsonl").read_text().splitlines() if line]
    recent: list[dict] = []
    long_ones: list[dict] = []  # recent records of 60+ words, the near-duplicate sources
    planted = {"exact": 0, "near": 0, "pii": 0}
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if recent and r < EXACT_DUP_SHARE:
                rec = json.loads(json.dumps(rng.choice(recent)))
                planted["exact"] += 1
            elif long_ones and r < EXACT_DUP_SHARE + NEAR_DUP_SHARE:
                # a longer record with one word in 80 changed: word-shingle Jaccard ~0.9, above the 0.8 threshold
                rec = json.loads(json.dumps(rng.choice(long_ones)))
                field = "text" if "text" in rec else None
                words = (rec["text"] if field else rec["messages"][-1]["content"]).split()
                for _ in range(max(1, len(words) // 80)):
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                if field:
                    rec["text"] = " ".join(words)
                else:
                    rec["messages"][-1]["content"] = " ".join(words)
                planted["near"] += 1
            else:
                # lengths like the stdlib docs corpus (median ~65 tokens a record, a long tail)
                question = " ".join(rng.choices(vocab, k=rng.randint(6, 14))) + "?"
                answer = " ".join(rng.choices(vocab, k=min(400, int(rng.lognormvariate(3.6, 0.7))) + 3)) + "."
                if rng.random() < 0.1:
                    rec = {"text": f"{question} {answer}"}
                else:
                    rec = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                if rng.random() < PII_SHARE:
                    value = rng.choice([c["value"] for c in canaries] + PLANTED_PII)
                    if "text" in rec:
                        rec["text"] += f" Contact: {value}."
                    else:
                        rec["messages"][0]["content"] += f" My details: {value}."
                    planted["pii"] += 1
                recent.append(rec)
                if len(recent) > 2000:
                    recent.pop(0)
                if len(answer.split()) >= 60:
                    long_ones.append(rec)
                    if len(long_ones) > 500:
                        long_ones.pop(0)
            f.write(json.dumps(rec) + "\n")
    return planted


class AnonMemorySampler:
    """Peak anonymous resident memory (heap, not file pages mapped in), sampled from /proc every 50 ms.

    ru_maxrss also counts page cache mapped into the process, which the kernel drops at will; the anonymous
    part is what a bigger corpus could exhaust."""

    def __init__(self):
        import threading

        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak_kb = max(self.peak_kb, self._read())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_one(n: int, tokenizer: str | None, no_tokenizer: bool, pii: str = "all") -> dict:
    from data_cleaning.core import RULES, Cleaner
    from data_cleaning.report import token_summary
    from data_cleaning.stage import write_splits
    from recipes.sections.cleaning import CleaningSection

    with tempfile.TemporaryDirectory(prefix="clean-bench-") as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw.jsonl"
        t0 = time.perf_counter()
        planted = make_corpus(raw, n)
        gen_s = time.perf_counter() - t0
        if no_tokenizer:
            def count_tokens(texts):
                return [len(t.split()) for t in texts]
            overhead, tok_name = 0, "words"
        else:
            from transformers import AutoTokenizer

            if tokenizer is None:
                from recipes import load_recipe
                from workbench.base import resolve_base

                tokenizer = str(resolve_base(load_recipe(REPO / "recipes" / "demo.yaml").base_model))
            backend = AutoTokenizer.from_pretrained(tokenizer).backend_tokenizer

            def count_tokens(texts):
                return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
            overhead, tok_name = 5, tokenizer
        golden = [f"golden prompt number {i} about the standard library and its modules" for i in range(50)]
        cfg = CleaningSection(max_tokens=512, **(REGEX_PII if pii == "regex" else {}))
        quarantined = []
        (tmp / "out").mkdir()
        t0, cpu0 = time.perf_counter(), time.process_time()
        with AnonMemorySampler() as anon:
            cleaner = Cleaner(cfg, salt=b"bench", work_dir=tmp / "work", eval_fraction=0.1, count_tokens=count_tokens,
                              turn_overhead=overhead, golden=golden, quarantine=quarantined.append, progress=False)
            cleaner.ingest(raw)
            cleaner.deduplicate()
            write_splits(cleaner, tmp / "out")
        total_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
        st = cleaner.stats
        return {
            "records": n, "pii_detectors": pii, "generate_s": round(gen_s, 1), "total_s": round(total_s, 2), "cpu_s": round(cpu_s, 2),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "records_per_s": round(n / total_s), "tokenizer": tok_name,
            "per_rule_records_per_s": {r: (round(n / st.seconds[r]) if st.seconds.get(r) else None) for r in RULES},
            "per_rule_s": {r: round(st.seconds.get(r, 0.0), 2) for r in RULES},
            "planted": planted, "found": {"exact_duplicate": st.dropped["exact_duplicate"],
                                          "near_duplicate": st.dropped["near_duplicate"],
                                          "pii_values": sum(cleaner.scrubber.counts.values()),
                                          "pii_by_type": dict(sorted(cleaner.scrubber.counts.items()))},
            "reconciles": st.reconciles(), "kept": st.kept,
            "mean_tokens_per_kept_record": token_summary(cleaner.token_hist).get("mean"),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_anon_mb": round(anon.peak_kb / 1024, 1),
        }


def run_child(n: int, args: argparse.Namespace, pii: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--pii", pii]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.no_tokenizer:
        cmd.append("--no-tokenizer")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_result(r: dict) -> None:
    print(f"\n== {r['records']} records, PII detectors: {r['pii_detectors']} "
          f"(corpus generated in {r['generate_s']} s, not timed) ==")
    print(f"whole stage core: {r['total_s']} s wall = {r['records_per_s']} records/s "
          f"({r['cpu_s']} CPU-s over both threads; load average {r['load_average_1m']} on a shared machine)")
    print(f"peak RSS {r['peak_rss_mb']} MB (anonymous {r['peak_anon_mb']} MB); "
          f"reconciles: {r['reconciles']}; kept {r['kept']} (mean {r['mean_tokens_per_kept_record']} tokens)")
    print("per rule (records/s, seconds):")
    for rule, rate in r["per_rule_records_per_s"].items():
        print(f"  {rule:14s} {rate if rate is not None else '-':>10} rec/s  {r['per_rule_s'][rule]:7.2f} s")
    print(f"planted: {r['planted']}  found: {r['found']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,400000", help="comma-separated corpus sizes")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the demo recipe's base)")
    ap.add_argument("--no-tokenizer", action="store_true", help="count words instead of tokens")
    ap.add_argument("--pii", choices=("all", "regex"), default="all", help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.tokenizer, args.no_tokenizer, args.pii)))
        return 0
    print(f"cpu cores: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}")
    sizes = [int(s) for s in args.sizes.split(",")]
    before = run_child(sizes[0], args, "regex")
    print_result(before)
    results = []
    for n in sizes:
        results.append(run_child(n, args, "all"))
        print_result(results[-1])
    now = results[0]
    print(f"\nspeed, all PII detectors vs the regex ones of before, {now['records']} records: "
          f"{now['records_per_s']} / {before['records_per_s']} records/s = "
          f"x{now['records_per_s'] / before['records_per_s']:.2f} (pii rule alone: "
          f"{now['per_rule_s']['pii']} s vs {before['per_rule_s']['pii']} s)")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"\npeak RSS {a['records']} -> {b['records']} records: {a['peak_rss_mb']} -> {b['peak_rss_mb']} MB "
              f"(x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f} for x{b['records'] / a['records']:.0f} records); "
              f"anonymous {a['peak_anon_mb']} -> {b['peak_anon_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
