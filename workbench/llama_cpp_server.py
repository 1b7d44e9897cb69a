"""llama-cpp-python's OpenAI-compatible server (the `[server]` extra) for one GGUF, as `workbench.serving` starts it.

    python -m workbench.llama_cpp_server --model FILE.gguf --name NAME [--host H --port P --threads N --n-ctx N
                                         --lineage JSON --lora ADAPTER.gguf --api-key-env VAR]

Its own app (llama_cpp.server.app.create_app) with two changes: `/v1/models` also returns the lineage (`tags`, the
same `key=value` list llama-server shows, and `lineage` as an object), and the API key is read from the environment
variable named by --api-key-env, so it never appears on a command line. Chats render the chat template embedded in
the GGUF (llama.cpp's own chat handling), greedy when asked for temperature 0 (no default repeat penalty).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def greedy_means_greedy() -> None:
    """llama-cpp-python's server applies a repeat penalty of 1.1 unless the request says otherwise, so temperature 0
    is not greedy there; the OpenAI API has no such parameter, and llama-server's default is 1.0. Make 1.0 the
    default here too: the same request then gets the same answer from every engine and from the gate's in-process
    llama.cpp."""
    from llama_cpp.server import types

    for model in (types.CreateCompletionRequest, types.CreateChatCompletionRequest):
        model.model_fields["repeat_penalty"].default = 1.0
        model.model_rebuild(force=True)


def build_app(args: argparse.Namespace):
    from fastapi import Depends
    from llama_cpp.server.app import authenticate, create_app, router
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    greedy_means_greedy()

    key = os.environ.get(args.api_key_env, "").strip() if args.api_key_env else None
    if args.api_key_env and not key:
        raise SystemExit(f"--api-key-env {args.api_key_env}: the environment variable is unset or empty")
    server = ServerSettings(host=args.host, port=args.port, api_key=key or None, interrupt_requests=False)
    model = ModelSettings(model=args.model, model_alias=args.name, n_ctx=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, lora_path=args.lora, chat_format=None, verbose=False,
                          seed=0, n_gpu_layers=0)
    # its /v1/models, replaced by one that also says which registered version this is
    router.routes[:] = [r for r in router.routes if getattr(r, "path", None) != "/v1/models"]
    app = create_app(server_settings=server, model_settings=[model])
    lineage = json.loads(args.lineage or "{}")

    @app.get("/v1/models", dependencies=[Depends(authenticate)])
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": args.name, "object": "model", "owned_by": "finetune-workbench", "permissions": [],
            "tags": [f"{k}={v}" for k, v in lineage.items()], "lineage": lineage}]}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.llama_cpp_server")
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--lineage", default="{}")
    p.add_argument("--lora")
    p.add_argument("--api-key-env")
    args = p.parse_args(argv)
    import uvicorn

    app = build_app(args)
    # uvicorn stops on SIGINT/SIGTERM: finishes the open responses, then exits 0
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
