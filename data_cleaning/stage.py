"""`python -m data_cleaning RECIPE`: raw domain JSONL -> clean/ (train, eval, heldout_text, report).

setup (raw data, golden set, base tokenizer, PII salt) -> clean (data_cleaning.core) -> save (Arrow
datasets, quarantine, report, manifest results).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from recipes import Recipe
from workbench.workspace import StageError, Workspace, sha256_file, stage_output

SALT_FILE = "pii_salt"
CORPUS_BUILDERS = {"pydoc": "demo.stdlib_qa", "tools": "demo.stdlib_tools"}  # data.build -> module with build_corpus


def run(recipe: Recipe, args: argparse.Namespace) -> int:
    cfg = recipe.cleaning
    with stage_output(recipe, "clean", force=args.force) as out:
        if out.skipped:
            print(f"clean: up to date ({out.final_dir}); use --force to re-run")
            return 0
        # ---- setup ----------------------------------------------------------------------------------
        raw_path, built_by = raw_data(recipe)
        golden = load_golden(recipe) if cfg.decontaminate else None
        tokenizer_name, count_tokens, turn_overhead = load_token_counter(recipe)
        ws = out.workspace
        salt, salt_source = pii_salt(ws, cfg.pii_salt_env)

        # ---- clean ----------------------------------------------------------------------------------
        from .core import Cleaner, InputError

        work = ws.scratch("clean") / f"run-{os.getpid()}"
        with open(out.dir / "quarantine.jsonl", "w", encoding="utf-8") as qf:
            cleaner = Cleaner(
                cfg, salt=salt, work_dir=work, eval_fraction=recipe.data.eval_fraction, count_tokens=count_tokens,
                turn_overhead=turn_overhead, golden=golden[1] if golden else None,
                quarantine=lambda entry: qf.write(json.dumps(entry, ensure_ascii=False) + "\n"),
            )
            try:
                try:
                    cleaner.ingest(raw_path)
                except InputError as exc:
                    raise StageError(f"data.raw: {exc}") from None
                cleaner.deduplicate()
                # ---- save -------------------------------------------------------------------------------
                fingerprints = write_splits(cleaner, out.dir)
            finally:
                cleaner.cleanup()
                shutil.rmtree(work, ignore_errors=True)
        report = save_report(recipe, cleaner, out, raw_path, built_by, golden, fingerprints, tokenizer_name)
        report["pii_salt_source"] = salt_source
        print_summary(recipe, report, raw_path)
    print(f"clean: wrote {out.final_dir}")
    return 0


def raw_data(recipe: Recipe) -> tuple[Path, str | None]:
    """The raw file (built by the recipe's source builder when missing), checked before the slow setup: a bad
    file fails in a second. Returns (path, name of the builder that made it or None)."""
    from .core import InputError, check_input

    raw_path, built_by = Path(recipe.data.raw), None
    if not raw_path.exists():
        if recipe.data.build is None:
            raise StageError(f"data.raw {raw_path}: no such file (or set data.build to one of the shipped corpus "
                             f"builders: {', '.join(CORPUS_BUILDERS)})")
        import importlib

        module = CORPUS_BUILDERS[recipe.data.build]
        print(f"clean: building the {recipe.data.build} corpus ({module}) into {raw_path}")
        print(f"clean: built {importlib.import_module(module).build_corpus(raw_path)} raw records")
        built_by = recipe.data.build
    try:
        check_input(raw_path)
    except InputError as exc:
        raise StageError(f"data.raw: {exc}") from None
    return raw_path, built_by


def save_report(recipe: Recipe, cleaner, out, raw_path: Path, built_by: str | None, golden, fingerprints: dict,
                tokenizer_name: str) -> dict:
    """report.json, report.md, the token-length histogram, and the manifest results."""
    from .report import build_report, write_histogram, write_json, write_markdown

    raw_info = {"path": str(raw_path), "sha256": sha256_file(raw_path), "built_by": built_by}
    golden_info = ({"path": str(recipe.data.golden), "sha256": golden[0], "records": len(golden[1])}
                   if golden else {"path": str(recipe.data.golden), "used": False})
    report = build_report(cleaner, raw=raw_info, golden=golden_info, fingerprints=fingerprints, tokenizer=tokenizer_name)
    write_json(report, out.dir / "report.json")
    write_markdown(report, out.dir / "report.md")
    write_histogram(cleaner.token_hist, out.dir / "token_lengths.png", recipe.cleaning.max_tokens)
    out.results.update({"counts": report["counts"], "fingerprints": fingerprints, "pii": report["pii"],
                        "quarantine_reasons": report["quarantine_reasons"], "raw": raw_info, "golden": golden_info})
    if not report["counts"]["reconciles"]:
        raise StageError("clean: the counts do not reconcile; this is a bug, the output was not kept")
    return report


def print_summary(recipe: Recipe, report: dict, raw_path: Path) -> None:
    counts = report["counts"]
    print(f"clean: {report['reconciliation']}")
    print(f"clean: train {counts['splits']['train']}, eval {counts['splits']['eval']}, "
          f"heldout_text {counts['splits']['heldout_text']}; PII replaced: "
          + (", ".join(f"{t} {n}" for t, n in report["pii"].items()) or "none"))
    if counts["upsampled"]:
        print("clean: upsampled " + ", ".join(f"{s} +{n} train rows" for s, n in counts["upsampled"].items()))
    # a warning, not an error: one recipe serves several corpora, and not every corpus has every mix
    unmatched = [s for s, k in recipe.cleaning.upsample.items() if k > 1 and s not in counts["upsampled"]]
    if unmatched:
        print(f"clean: warning: cleaning.upsample names source {', '.join(map(repr, unmatched))}, which no kept "
              f"train record of {raw_path} has (the raw records' `source` field); nothing was upsampled for it",
              file=sys.stderr)


def load_golden(recipe: Recipe) -> tuple[str, list[str]]:
    from .decontam import golden_texts

    path = Path(recipe.data.golden)
    if not path.is_file():
        raise StageError(f"data.golden {path}: no such file (decontamination needs the golden set; "
                         "set cleaning.decontaminate: false to skip it)")
    try:
        return sha256_file(path), golden_texts(path)
    except ValueError as exc:
        raise StageError(f"data.golden: {exc}") from None


def load_token_counter(recipe: Recipe):
    """(tokenizer label, texts -> token counts, tokens a chat turn adds around its content)."""
    from transformers import AutoTokenizer

    from workbench.base import resolve_base
    from workbench.chat import chatml_turn_overhead

    base = resolve_base(recipe.base_model)
    tok = AutoTokenizer.from_pretrained(base)
    backend = tok.backend_tokenizer  # the Rust tokenizer: batch encoding without Python per token
    # without character offsets where the tokenizers version has it: a third faster, and we only count
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in encode(texts, add_special_tokens=False)]

    # Training renders turns in ChatML; its markers cost the same few tokens around every turn.
    overhead = chatml_turn_overhead(lambda text: len(backend.encode(text, add_special_tokens=False).ids))
    return recipe.base_model.label, count_tokens, overhead


def pii_salt(ws: Workspace, env_name: str) -> tuple[bytes, str]:
    """The placeholder salt: from the environment, else a random one kept in the workspace's scratch
    (stable across re-runs of this workspace, never written to any output)."""
    value = os.environ.get(env_name)
    if value:
        return value.encode(), f"environment variable {env_name}"
    path = ws.scratch("clean") / SALT_FILE
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(32))
        os.replace(tmp, path)
    return path.read_text().strip().encode(), "workspace scratch (set " + env_name + " to share one across workspaces)"


def write_splits(cleaner, out_dir: Path) -> dict[str, str]:
    """Stream the kept records into one Arrow dataset per split; returns sha256 fingerprints of the rows.

    Each split's Arrow file is written in place, in the layout `Dataset.save_to_disk` makes (one shard plus
    state.json and dataset_info.json, from the library's own Dataset object): writing it to a cache first and
    copying would read the whole split back through a memory map, and resident memory would grow with the corpus.
    """
    from datasets import Dataset, Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    from .core import SPLITS

    chat = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
    text = Features({"text": Value("string")})
    shard = "data-00000-of-00001.arrow"
    writers, digests = {}, {}
    for split in SPLITS:
        (out_dir / split).mkdir()
        writers[split] = ArrowWriter(features=text if split == "heldout_text" else chat,
                                     path=str(out_dir / split / shard), writer_batch_size=1000)
        digests[split] = hashlib.sha256()
    for split, row in cleaner.kept():
        writers[split].write(row)
        digests[split].update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    fingerprints = {}
    for split in SPLITS:
        writers[split].finalize()
        fingerprints[split] = "sha256:" + digests[split].hexdigest()
        ds = Dataset.from_file(str(out_dir / split / shard))  # maps the file; reads only its schema
        fmt = ds.format
        state = {"_data_files": [{"filename": shard}], "_fingerprint": digests[split].hexdigest()[:16],
                 "_format_columns": fmt["columns"], "_format_kwargs": fmt["format_kwargs"],
                 "_format_type": fmt["type"], "_output_all_columns": fmt["output_all_columns"], "_split": None}
        (out_dir / split / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        ds.info.write_to_directory(str(out_dir / split), pretty_print=True)
        del ds
    return fingerprints
