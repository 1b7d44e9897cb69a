"""Pinned bases: the SmolLM2 GGUF import gives a working, offline, verifiable save_pretrained directory."""
from __future__ import annotations

import os
import shutil

import pytest

from recipes.sections.base_model import BaseModelSection
from workbench.base import resolve_base, weight_hashes
from workbench.workspace import StageError


def _linked_copy(src, dst):
    """A copy whose big weight file is a hard link (cheap) and whose small files are real copies."""
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix == ".safetensors":
            os.link(p, dst / p.name)
        else:
            shutil.copy(p, dst / p.name)
    return dst


def test_tokenizer_is_byte_level_like_the_original(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    ids = tok("Hello 123 world").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["Hello", "Ġ", "1", "2", "3", "Ġworld"]
    text = "naïve café — 日本語 tabs\tand  spaces\n"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_chat_template_generation_answers_sensibly(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=False)
    assert "Paris" in answer
    assert answer.rstrip().endswith("<|im_end|>"), "generation must stop at the end-of-turn token"


def test_manifest_verifies_and_tampering_is_caught(smollm2_dir, tmp_path, run_cli):
    ok = run_cli("-m", "workbench", "base", "verify", str(smollm2_dir))
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    copy = _linked_copy(smollm2_dir, tmp_path / "copy")
    (copy / "tokenizer_config.json").write_text("{}")
    bad = run_cli("-m", "workbench", "base", "verify", str(copy))
    assert bad.returncode == 1
    assert f"{copy / 'tokenizer_config.json'}" in bad.stderr


def test_resolve_base_checks_pinned_hashes_and_refuses_pickles(smollm2_dir, tmp_path):
    pinned = weight_hashes(smollm2_dir)
    assert resolve_base(BaseModelSection(path=smollm2_dir, sha256=pinned)) == smollm2_dir.resolve()
    with pytest.raises(StageError, match="do not match"):
        resolve_base(BaseModelSection(path=smollm2_dir, sha256={"model.safetensors": "0" * 64}))
    copy = _linked_copy(smollm2_dir, tmp_path / "copy")
    (copy / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(StageError, match="pickle weight files are refused"):
        resolve_base(BaseModelSection(path=copy, sha256=pinned))
    with pytest.raises(StageError, match="no such directory"):
        resolve_base(BaseModelSection(path=tmp_path / "absent", sha256=pinned))


def test_hub_base_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    section = BaseModelSection(hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", revision="a" * 40)
    with pytest.raises(StageError, match="not in the local Hugging Face cache"):
        resolve_base(section)


def test_demo_recipe_pins_what_the_import_produces(smollm2_dir):
    """The import is deterministic: the demo recipe's pinned sha256 is what `wb base smollm2` writes."""
    from recipes import load_recipe

    demo = load_recipe("recipes/demo.yaml")
    assert demo.base_model.sha256 == weight_hashes(smollm2_dir)
