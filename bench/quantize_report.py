"""Measure the quantize stage on the real SmolLM2-135M-Instruct: time, peak memory and size of every target,
and held-out perplexity of fp32 (merged), AWQ, plain 4-bit round-to-nearest (same W4A16 format, same group
size), and the F16 / Q8_0 / Q4_K_M GGUFs.

    OMP_NUM_THREADS=1 python bench/quantize_report.py [--workdir DIR] [--calibration-samples 64] [--json OUT]

The domain is the demo's: the Python standard library. Calibration records (questions about a function,
answered with its docstring) and held-out text (docstrings of other modules, never calibrated on) are built
from the installed stdlib with `pydoc`-style introspection, so nothing is downloaded. The quantize stage runs
for real (`python -m quantize`); its upstream (clean/ and train/adapter/) is written through the workspace API
with a small random LoRA adapter. All perplexities are computed on identical token ids.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CALIBRATION_MODULES = ("json", "os.path", "pathlib", "collections", "itertools", "functools", "re", "subprocess",
                       "argparse", "datetime", "shutil", "tempfile", "csv", "hashlib", "logging", "textwrap",
                       "string", "heapq", "bisect", "statistics", "random", "math", "zipfile", "tarfile", "base64",
                       "enum", "dataclasses", "contextlib", "operator", "copy", "glob", "io", "difflib", "struct")
HELDOUT_MODULES = ("queue", "threading", "urllib.parse", "html", "sqlite3", "configparser", "shlex", "inspect",
                   "traceback", "warnings", "fractions", "decimal", "calendar", "uuid", "gzip", "pprint", "fnmatch")

def documented(module_name: str) -> list[tuple[str, str]]:
    mod = importlib.import_module(module_name)
    out = []
    for name in sorted(dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name)
        doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) else None
        if doc and len(doc) > 120 and getattr(obj, "__module__", "").split(".")[0] == module_name.split(".")[0]:
            out.append((f"{module_name}.{name}", doc[:1500]))
    return out


def build_upstream(recipe_path: Path, base_dir: Path, n_train: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from recipes import load_recipe
    from workbench.chat import CHATML_END, CHATML_PATH
    from workbench.workspace import stage_output

    recipe = load_recipe(recipe_path)
    rng = random.Random(0)
    qa = [x for m in CALIBRATION_MODULES for x in documented(m)]
    rng.shuffle(qa)
    qa = qa[:n_train + 8]
    messages = [[{"role": "user", "content": f"What does {name} do?"}, {"role": "assistant", "content": doc}]
                for name, doc in qa]
    heldout = [f"{name}\n\n{doc}" for m in HELDOUT_MODULES for name, doc in documented(m)]
    with stage_output(recipe, "clean", force=True) as out:
        Dataset.from_dict({"messages": messages[:n_train]}).save_to_disk(str(out.dir / "train"))
        Dataset.from_dict({"messages": messages[n_train:]}).save_to_disk(str(out.dir / "eval"))
        Dataset.from_dict({"text": heldout}).save_to_disk(str(out.dir / "heldout_text"))
        out.results = {"counts": {"train": n_train, "eval": len(messages) - n_train, "heldout_text": len(heldout)},
                       "fingerprints": {"train": "bench", "eval": "bench", "heldout_text": "bench"}}
    with stage_output(recipe, "train", force=True) as out:
        tok = AutoTokenizer.from_pretrained(base_dir)
        tok.chat_template = CHATML_PATH.read_text()  # what the train stage ships
        tok.eos_token = CHATML_END
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                               LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)  # a small adapter: the merge is real, the model stays itself
        model.save_pretrained(out.dir / "adapter")
        tok.save_pretrained(out.dir / "adapter")
        GenerationConfig(do_sample=False, max_new_tokens=128, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id).save_pretrained(out.dir / "adapter")
        out.results = {"method": "lora", "steps": 0, "train_loss": None, "eval_perplexity": None,
                       "base_eval_perplexity": None, "mlflow_run_id": None}
    return {"heldout_records": len(heldout), "calibration_records": n_train}


def heldout_windows(clean_dir: Path, tokenizer, window: int, max_tokens: int) -> list[list[int]]:
    from datasets import load_from_disk

    ids: list[int] = []
    for text in load_from_disk(str(clean_dir / "heldout_text"))["text"]:
        ids += tokenizer(text + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    return [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]


def hf_perplexity(model_dir: Path, windows: list[list[int]]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            logits = model(x).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            n += len(w) - 1
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=".cache/bench-quantize")
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import yaml
    from transformers import AutoTokenizer

    from quantize.awq import compressed_bits_per_weight, quantize_w4a16
    from quantize.llama_ops import run_llama
    from quantize.measure import measured
    from recipes import load_recipe
    from workbench.base import import_gguf, smollm2_gguf_path, weight_hashes
    from workbench.workspace import Workspace

    work = (REPO / args.workdir).resolve()
    base = REPO / ".cache" / "tests" / "smollm2-135m-instruct"
    if not (base / "manifest.json").is_file():
        import_gguf(smollm2_gguf_path(), base)
    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    data.update(name="bench-quantize", workspace=str(work / "runs"))
    data["base_model"] = {"path": str(base), "sha256": weight_hashes(base)}
    data["quantize"] = {"merge": True, "targets": [{"kind": "gguf", "types": ["F16", "Q8_0", "Q4_K_M"]},
                                                  {"kind": "awq", "calibration_samples": args.calibration_samples}]}
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / "bench-quantize.yaml"
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    upstream = build_upstream(recipe_path, base, args.calibration_samples)

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantize", str(recipe_path), "--force"], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return 1
    stage_seconds = time.perf_counter() - t0
    ws = Workspace(load_recipe(recipe_path))
    qdir = ws.stage_dir("quantize")
    arts = {a["name"]: a for a in ws.manifest("quantize")["results"]["artifacts"]}
    awq = arts["awq"]

    # plain round-to-nearest in the same format: the baseline AWQ must beat
    rtn_dir = work / "rtn"
    with measured() as rtn_m:
        quantize_w4a16(qdir / "merged", rtn_dir, awq["group_size"], symmetric=False, use_awq=False)

    tok = AutoTokenizer.from_pretrained(qdir / "merged")
    windows = heldout_windows(ws.stage_dir("clean"), tok, args.window, args.heldout_tokens)
    ppl = {"fp32 (merged)": hf_perplexity(qdir / "merged", windows), "awq": hf_perplexity(qdir / "awq", windows),
           "rtn": hf_perplexity(rtn_dir, windows)}
    for t in ("F16", "Q8_0", "Q4_K_M"):
        r = run_llama("perplexity", qdir / "gguf" / f"model-{t}.gguf", windows=windows)
        ppl[f"gguf:{t}"] = math.exp(r["nll"] / r["tokens"])

    f16 = arts["gguf:F16"]["size_bytes"]
    rows = [(n, a["bits_per_weight"], a["size_bytes"], a.get("size_ratio_vs_f16"), a["seconds"], a["peak_rss_mb"])
            for n, a in arts.items()]
    rows.append(("rtn (bench only)", compressed_bits_per_weight(rtn_dir), sum(p.stat().st_size for p in rtn_dir.rglob("*") if p.is_file()),
                 None, rtn_m["seconds"], rtn_m["peak_rss_mb"]))
    print(f"\nquantize stage on SmolLM2-135M-Instruct: {stage_seconds:.0f} s wall; "
          f"{upstream['calibration_records']} calibration records, {len(windows)}x{args.window} held-out tokens")
    print(f"{'artifact':<18}{'bits/w':>8}{'size MB':>10}{'vs F16':>8}{'seconds':>9}{'peak MB':>9}")
    for n, bpw, size, ratio, sec, peak in rows:
        print(f"{n:<18}{(bpw or float('nan')):>8.2f}{size / 1e6:>10.1f}{(ratio or float('nan')):>8.3f}{sec:>9.1f}{peak:>9.0f}")
    print(f"\n{'held-out perplexity':<22}")
    for k, v in ppl.items():
        print(f"  {k:<20}{v:>8.2f}")
    verdict = "AWQ beats plain rounding" if ppl["awq"] < ppl["rtn"] else "AWQ does NOT beat plain rounding"
    print(f"\n{verdict}: {ppl['awq']:.2f} vs {ppl['rtn']:.2f} (fp32 {ppl['fp32 (merged)']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"perplexity": ppl, "artifacts": arts, "rtn_seconds": rtn_m["seconds"],
                                               "size_ratio_vs_f16": {n: a["size_bytes"] / f16 for n, a in arts.items()
                                                                     if n.startswith("gguf:")}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
