"""llama.cpp's own converters, `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py`, of the same llama.cpp
version as the pinned llama-cpp-python (so the converter, the quantizer and the runtime agree on every
architecture, tokenizer pre-split and metadata key).

They come from llama-cpp-python's source distribution, which vendors the llama.cpp tree: `make install` runs
`python -m quantize.gguf_convert install`, which takes that sdist (pinned by version and sha256, fetched once
and kept: `workbench.llama_sdist`) and extracts the converters, their `conversion/` package and `gguf-py` into the virtual environment. Nothing is
fetched at run time. Each conversion runs as a child process: it imports torch and its own gguf-py, and a
refusal (an unknown architecture or pre-tokenizer) becomes an error naming the model and quoting the converter.

Stdlib-only at import time: recipe validation asks `converter_architectures()` without loading torch.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# the pinned sdist lives in the spine: the llama-server build takes its llama.cpp tree from the same file
from workbench.llama_sdist import LLAMA_CPP_PYTHON, SDIST_SHA256, TREE_PREFIX, install_or_where, sdist as pinned_sdist

# what the converters need from the vendored llama.cpp tree (paths relative to it)
TREE_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE",
              # Qwen2's real vocabulary, as llama.cpp's tokenizer tests ship it: the tests' tiny Qwen models use it
              # (transformers always splits a Qwen2 model's text with Qwen2's own regex, and the converter
              # recognises that split only by the token ids it gives on Qwen2's own vocabulary)
              "models/ggml-vocab-qwen2.gguf")
STAMP = "SOURCE.json"


def tools_dir() -> Path:
    """Where `make install` puts the converters: inside the virtual environment that runs the workbench."""
    return Path(sys.prefix) / "share" / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"


def installed_tools() -> Path | None:
    d = tools_dir()
    try:
        stamp = json.loads((d / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if stamp.get("sha256") == SDIST_SHA256 else None


def missing_tools_message() -> str:
    return (f"llama.cpp's converters (from llama-cpp-python {LLAMA_CPP_PYTHON}'s source distribution) are not "
            f"installed at {tools_dir()}; run `make install` (or `python -m quantize.gguf_convert install`)")


def require_tools() -> Path:
    d = installed_tools()
    if d is None:
        from workbench.workspace import StageError

        raise StageError(missing_tools_message())
    return d


def converter_architectures(tools: Path | None = None) -> frozenset[str] | None:
    """The HF architecture names convert_hf_to_gguf.py converts (its TEXT_MODEL_MAP), read without importing
    it (that would import torch); None when the converters are not installed."""
    tools = tools or installed_tools()
    if tools is None:
        return None
    tree = ast.parse((tools / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant) and "." not in k.value)
    raise RuntimeError(f"{tools}/conversion/__init__.py: no TEXT_MODEL_MAP literal (not the expected llama.cpp tree)")


# ---- install (make install) ----------------------------------------------------------------------------------

def install(sdist: Path | None = None, dest: Path | None = None) -> Path:
    """Extract the converters from the pinned sdist (the kept copy, downloaded once when absent) into dest
    (default: tools_dir())."""
    dest = dest or tools_dir()
    sdist = pinned_sdist(sdist)
    prefix = TREE_PREFIX
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                   and any(m.name[len(prefix):] == p or (p.endswith("/") and m.name[len(prefix):].startswith(p))
                           for p in TREE_PARTS)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(staging, members=members, filter="data")
    for part in TREE_PARTS:
        if not (staging / part).exists():
            raise SystemExit(f"{sdist}: {prefix}{part} is missing")
    (staging / STAMP).write_text(json.dumps({"package": "llama-cpp-python", "version": LLAMA_CPP_PYTHON,
                                             "sha256": SDIST_SHA256, "files": len(members)}, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


# ---- running the converters ------------------------------------------------------------------------------------

def _run_tool(script: str, args: list[str], model: Path, timeout: float) -> str:
    """Run one of the vendored llama.cpp scripts; its refusal becomes a StageError naming the model."""
    from workbench.workspace import StageError

    tools = require_tools()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"  # the converters may ask the hub for a config: never at run time
    env.pop("NO_LOCAL_GGUF", None)  # they must use their own gguf-py, not the project's
    try:
        proc = subprocess.run([sys.executable, str(tools / script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=str(tools))
    except subprocess.TimeoutExpired:
        raise StageError(f"{model}: llama.cpp's {script} did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise StageError(f"{model}: llama.cpp's {script} (llama-cpp-python {LLAMA_CPP_PYTHON}) refused it: "
                         f"{converter_message(proc.stderr + proc.stdout)}")
    return proc.stderr


def converter_message(output: str) -> str:
    """The converter's own reason: its ERROR log lines, else the exception line that ended a traceback."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [re.sub(r"^ERROR:[\w.-]+:", "", ln) for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return " / ".join(errors[-3:])
    ends = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", ln)]
    return (ends or lines or ["(no output)"])[-1]


def convert_hf_to_gguf(model_dir: Path, out_path: Path, outtype: str = "f16", timeout: float = 7200) -> None:
    """model_dir (a save_pretrained directory with its tokenizer) -> out_path, by convert_hf_to_gguf.py."""
    _run_tool("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out_path), "--outtype", outtype],
              model_dir, timeout)


def vocab_only_gguf(model_dir: Path, out_path: Path, timeout: float = 600) -> None:
    """Just the tokenizer and metadata: what the converter would refuse about a model's vocabulary, in seconds."""
    _run_tool("convert_hf_to_gguf.py", [str(model_dir), "--vocab-only", "--outfile", str(out_path)], model_dir, timeout)


def convert_lora_to_gguf(adapter_dir: Path, base_dir: Path, out_path: Path, outtype: str = "f16",
                         timeout: float = 3600) -> None:
    """A PEFT LoRA adapter -> a GGUF adapter for the base in base_dir (only its config is read)."""
    _run_tool("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out_path),
                                          "--outtype", outtype], adapter_dir, timeout)


def main(argv: list[str] | None = None) -> int:
    return install_or_where("python -m quantize.gguf_convert", "llama.cpp converters", "Install llama.cpp's converters",
                            f"download (pinned sha256) and extract into {tools_dir()}", install, installed_tools,
                            missing_tools_message, argv)


if __name__ == "__main__":
    sys.exit(main())
