"""`python -m registry publish RECIPE` and the registry commands behind `wb promote|rollback|pull|serve|ui|approve`.

Which store: `--tracking-uri` > MLFLOW_TRACKING_URI > `--recipe RECIPE` (that recipe's server or embedded
store). Credentials for a server: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the environment.
Exit codes: 0 done, 1 refused or failed (the message says which condition), 2 bad command line or recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from workbench.workspace import StageError


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="use this recipe's MLflow store (its tracking_uri, else the embedded store)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides MLFLOW_TRACKING_URI and --recipe)")


def _version_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--version", help="version number")
    g.add_argument("--alias", help="alias, e.g. candidate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wb", description="MLflow registry: publish, approve, promote, pull")
    sub = parser.add_subparsers(dest="cmd", required=True)

    pub = sub.add_parser("publish", help="register the gate-passed candidate (last stage of `wb run`)")
    pub.add_argument("recipe")
    pub.add_argument("--force", action="store_true", help="publish again even if up to date")

    ap = sub.add_parser("approve", help="set the approval tags on a version (what a reviewer does in the UI)")
    _version_args(ap)
    ap.add_argument("--by", help="reviewer name (default: GITHUB_ACTOR, MLFLOW_TRACKING_USERNAME, login)")
    ap.add_argument("--reject", action="store_true", help="record a rejection instead")
    ap.add_argument("--note", default="", help="free text kept in approval_note")
    _store_args(ap)

    pr = sub.add_parser("promote", help="move @champion to a gate-passed, approved, verified version")
    _version_args(pr)
    pr.add_argument("--by", help="who promotes (default: GITHUB_ACTOR, MLFLOW_TRACKING_USERNAME, login)")
    pr.add_argument("--reason", default="", help="why, kept in the audit tag")
    _store_args(pr)

    rb = sub.add_parser("rollback", help="move @champion back to @previous")
    rb.add_argument("model")
    rb.add_argument("--by")
    rb.add_argument("--reason", default="")
    _store_args(rb)

    pl = sub.add_parser("pull", help="download one format of a version, verify every sha256, write launch lines")
    pl.add_argument("uri", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    pl.add_argument("--format", required=True, help="adapter | merged | awq | gguf:<TYPE> (e.g. gguf:Q4_K_M) | gguf_adapter")
    pl.add_argument("--dest", required=True, help="directory to write into")
    _store_args(pl)

    sv = sub.add_parser("serve", help="pull + verify a version, then serve it behind an OpenAI-compatible API")
    sv.add_argument("source", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local .gguf file")
    sv.add_argument("--format", help="gguf:<TYPE> | gguf_adapter (llama.cpp); merged | awq | adapter (vLLM)")
    sv.add_argument("--engine", default="auto", help="auto (llama-server when built) | llama-server | "
                                                      "llama-cpp-python | vllm")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs "
                                                         "--allow-remote and --api-key-env)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--allow-remote", action="store_true", help="allow binding an address other machines reach")
    sv.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key clients must send")
    sv.add_argument("--name", help="model name for a local .gguf (default: the file name)")
    sv.add_argument("--dest", help="keep the verified pull here (default: a temporary directory, removed on exit)")
    sv.add_argument("--threads", type=int, help="llama.cpp threads (default: OMP_NUM_THREADS or all cores)")
    sv.add_argument("--parallel", type=int, default=4, help="requests served at once (llama-server slots)")
    sv.add_argument("--n-ctx", type=int, default=2048, help="context per request")
    _store_args(sv)

    ui = sub.add_parser("ui", help="start the MLflow UI on a recipe's embedded store (127.0.0.1)")
    ui.add_argument("recipe_file", nargs="?", metavar="RECIPE", help="recipe whose store to show")
    ui.add_argument("--port", type=int, default=5000)
    _store_args(ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except StageError as exc:
        print(f"wb {args.cmd}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # the server said no (401/403, unknown model...): its message, not a traceback
        if type(exc).__name__ == "MlflowException" or "RestException" in type(exc).__name__:
            print(f"wb {args.cmd}: error: MLflow refused: {exc}", file=sys.stderr)
            return 1
        raise


def _dispatch(args) -> int:
    if args.cmd == "publish":
        from workbench.stage_cli import stage_main

        argv = [args.recipe] + (["--force"] if args.force else [])
        return stage_main("registry publish", "publish the gate-passed candidate to MLflow", "registry.publish:run", argv)

    from .store import client_for, resolve_tracking_uri

    if args.cmd == "ui":
        return _ui(args, resolve_tracking_uri(args.tracking_uri, args.recipe_file or args.recipe))
    if args.cmd == "serve":
        from .serve import serve

        return serve(args, lambda: client_for(resolve_tracking_uri(args.tracking_uri, args.recipe)))
    client = client_for(resolve_tracking_uri(args.tracking_uri, args.recipe))
    if args.cmd == "approve":
        from .promote import approve

        v = approve(client, args.model, args.version, args.alias, args.by, args.reject, args.note)
        print(f"approve: {args.model} v{v}: approval={'rejected' if args.reject else 'approved'}")
    elif args.cmd == "promote":
        from .promote import promote

        promote(client, args.model, args.version, args.alias, args.by, args.reason)
    elif args.cmd == "rollback":
        from .promote import rollback

        rollback(client, args.model, args.by, args.reason)
    elif args.cmd == "pull":
        from .pull import pull

        info = pull(client, args.uri, args.format, Path(args.dest))
        print(f"pull: {info['model']} v{info['version']} {info['format']} -> {info['dest']} (verified)")
        print("\n".join(info["launch"]))
        print(json.dumps({k: v for k, v in info.items() if k != "launch"}), file=sys.stderr)
    return 0


def _ui(args, uri: str) -> int:
    """`mlflow ui` on the store, loopback only. The embedded store's artifacts are absolute file URIs."""
    if not uri.startswith(("sqlite:", "postgresql:", "mysql:")):
        raise StageError(f"`wb ui` serves a database store; {uri} is a server: open it in a browser instead")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    print(f"wb ui: http://127.0.0.1:{args.port}  ({uri})", flush=True)
    # become the UI process: Ctrl-C and SIGTERM then reach mlflow directly, nothing is left behind
    os.execv(sys.executable, cmd)
    return 0
