"""`wb serve`: pull one format of a registered version, verify every byte, and serve it behind an OpenAI-compatible API.

    wb serve models:/NAME@ALIAS --format gguf:Q8_0 [--port 8080] [--engine auto|llama-server|llama-cpp-python|vllm]
             [--host 127.0.0.1 [--allow-remote --api-key-env VAR]] [--dest DIR] [--recipe R | --tracking-uri URI]
    wb serve FILE.gguf --name NAME ...     (a local file: its sha256 is the lineage)

The pull is `wb pull`'s: a file that does not match the version's sha256 manifest is refused and nothing starts.
The model is served under the registered name, with the chat template embedded in the GGUF (the one the gate
checked against train/adapter's), and its lineage (name, version, sha256 of the served file) is printed on the
console and returned in /v1/models. Ctrl-C (or SIGTERM) stops the server and removes a temporary pull.
"""
from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from workbench.workspace import StageError, sha256_file

LLAMA_FORMATS = "gguf:<TYPE> or gguf_adapter"
VLLM_FORMATS = ("merged", "awq", "adapter")


def _engine_for(engine: str | None, fmt: str | None) -> str:
    from workbench.serving import require_engine, resolve_engine

    chosen = resolve_engine(engine)
    if fmt is not None:
        if chosen == "vllm" and fmt not in VLLM_FORMATS:
            raise StageError(f"--engine vllm serves {', '.join(VLLM_FORMATS)}; --format {fmt} is for llama.cpp")
        if chosen != "vllm" and not (fmt.startswith("gguf:") or fmt == "gguf_adapter"):
            raise StageError(f"--engine {chosen} serves {LLAMA_FORMATS}; --format {fmt} needs --engine vllm "
                             "(a GPU machine with vLLM installed)")
    require_engine(chosen)
    return chosen


def pulled_spec(client, uri: str, fmt: str, dest: Path, engine: str, **serve_kw):
    """Pull + verify (registry.pull), then the ServeSpec of what was pulled, with its lineage."""
    import json

    from workbench.serving import ServeSpec

    from .files import SHA256_MANIFEST
    from .pull import pull
    from .store import get_version, parse_model_uri

    info = pull(client, uri, fmt, dest)
    name, _, alias = parse_model_uri(uri)
    files = json.loads((dest / SHA256_MANIFEST).read_text())["files"]
    mv = get_version(client, name, info["version"])
    lineage = {"model": name, "version": str(info["version"]), "uri": uri, "format": fmt,
               "gate_passed": mv.tags.get("gate.passed", "unset")}
    lora = None
    if fmt.startswith("gguf:"):
        rel = f"gguf/model-{fmt.split(':', 1)[1]}.gguf"
        model = dest / rel
    elif fmt == "gguf_adapter":
        rel, model, lora = "gguf_adapter/base-F16.gguf", dest / "gguf_adapter" / "base-F16.gguf", \
            dest / "gguf_adapter" / "adapter-F16.gguf"
        lineage["adapter_sha256"] = files["gguf_adapter/adapter-F16.gguf"]["sha256"]
    else:  # vllm: a directory (merged / awq), or the adapter on its pinned base
        return _vllm_spec(name, fmt, dest, mv, lineage, **serve_kw)
    lineage.update(file=rel, sha256=files[rel]["sha256"])
    return ServeSpec(model=model, name=name, lora=lora, lineage=lineage, **serve_kw)


def _vllm_spec(name: str, fmt: str, dest: Path, mv, lineage: dict, **serve_kw):
    import json

    from workbench.serving import ServeSpec

    lineage["files_sha256"] = mv.tags.get("files.sha256", "")
    if fmt != "adapter":
        return ServeSpec(model=dest / fmt, name=name, lineage={**lineage, "dir": fmt}, **serve_kw)
    cfg = json.loads((dest / "adapter" / "adapter_config.json").read_text())
    base = (cfg.get("base_model_name_or_path") or mv.tags.get("base_model", "")).split("@", 1)[0]
    rev = mv.tags.get("base_model.revision")
    extra = (["--revision", rev] if rev else []) + ["--max-lora-rank", str(cfg.get("r", 16))]
    return ServeSpec(model=Path(base), name=name, lora=dest / "adapter", lineage=lineage, extra_args=extra, **serve_kw)


def local_spec(path: Path, name: str | None, **serve_kw):
    from workbench.serving import ServeSpec

    if not path.is_file() or path.suffix != ".gguf":
        raise StageError(f"{path}: not a .gguf file (serve a registered version with models:/NAME@ALIAS)")
    name = name or path.stem
    return ServeSpec(model=path.resolve(), name=name,
                     lineage={"model": name, "file": path.name, "sha256": sha256_file(path)}, **serve_kw)


def describe(spec, engine: str) -> list[str]:
    lin = spec.lineage
    what = f"{lin.get('model')} v{lin['version']} ({lin['uri']}, {lin['format']})" if "version" in lin else \
        f"{lin.get('model')} ({spec.model})"
    lines = [f"serve: {what}, engine {engine}"]
    if "sha256" in lin:
        how = "verified against the version's sha256.json" if "version" in lin else "of the local file, not registered"
        lines.append(f"serve: {lin['file']} sha256 {lin['sha256']} ({how})")
    if "gate_passed" in lin:
        lines.append(f"serve: gate.passed={lin['gate_passed']}")
    lines.append(f"serve: {spec.base_url}  model {spec.name!r}"
                 + (f", API key from ${spec.api_key_env}" if spec.api_key_env else ", no API key (loopback only)")
                 + "; Ctrl-C stops it")
    return lines


def run_foreground(spec, engine: str, ready_timeout: float = 600.0) -> int:
    """Start the server with its output on this console, print the lineage once it answers, and wait; Ctrl-C or
    SIGTERM stops it cleanly (exit 0). A server that dies on its own exits with its status."""
    from workbench.serving import Server

    srv = Server(spec, engine)

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        srv.start(ready_timeout)
        for line in describe(spec, engine):
            print(line, flush=True)
        while srv.proc.poll() is None:
            time.sleep(0.5)
        raise StageError(f"{engine} exited on its own with status {srv.proc.returncode}")
    except KeyboardInterrupt:
        rc = srv.stop()
        print(f"serve: stopped ({engine} exit status {rc})", flush=True)
        return 0
    finally:
        srv.stop()
        signal.signal(signal.SIGTERM, previous)


def serve(args, client_factory) -> int:
    """The `wb serve` command: check the bind and the engine first, then pull + verify, then serve."""
    from workbench.serving import check_bind, default_threads

    check_bind(args.host, args.allow_remote, args.api_key_env)
    kw = dict(host=args.host, port=args.port, api_key_env=args.api_key_env, threads=args.threads or default_threads(),
              n_ctx=args.n_ctx, parallel=args.parallel)
    if not args.source.startswith("models:/"):
        engine = _engine_for(args.engine, None)
        return run_foreground(local_spec(Path(args.source), args.name, **kw), engine)
    if not args.format:
        raise StageError(f"{args.source}: --format is required (gguf:<TYPE>, gguf_adapter, or for vLLM "
                         f"{', '.join(VLLM_FORMATS)})")
    engine = _engine_for(args.engine, args.format)
    temp = None if args.dest else Path(tempfile.mkdtemp(prefix="wb-serve-"))
    try:
        spec = pulled_spec(client_factory(), args.source, args.format, Path(args.dest) if args.dest else temp, engine,
                           **kw)
        return run_foreground(spec, engine)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
            print(f"serve: removed the temporary pull {temp}", file=sys.stderr)
