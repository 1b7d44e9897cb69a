"""The train stage on the real SmolLM2-135M-Instruct: a few steps, then the adapter answers through peft."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._train_helpers import make_clean


@pytest.mark.e2e
def test_smollm2_adapter_answers_through_peft_with_the_trained_template(smollm2_dir, make_recipe, run_cli):
    import torch
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    recipe = make_recipe(base_dir=smollm2_dir, train={
        "max_steps": 3, "batch_size": 2, "save_steps": 10, "logging_steps": 1, "max_seq_len": 96,
        "heldout_max_records": 2, "learning_rate": 0.0003})
    make_clean(recipe, n_train=8, n_eval=2, n_heldout=2)
    run_cli("-m", "train", str(recipe), check=True)
    data = yaml.safe_load(recipe.read_text())
    out = Path(data["workspace"]) / data["name"] / "train"
    res = json.loads((out / "manifest.json").read_text())["results"]
    assert res["steps"] == 3 and res["base_eval_perplexity"] < 1000  # a real model, not noise

    adapter = out / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)
    gen = GenerationConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), adapter).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**prompt, generation_config=gen, max_new_tokens=96)[0, prompt["input_ids"].shape[1]:]
    answer = tok.decode(ids, skip_special_tokens=True).strip()
    assert answer, "empty answer"
    # an answer never runs on into a new turn: generation halts on the template's end-of-turn token
    assert "<|im_start|>" not in tok.decode(ids)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    if len(ids) < 96:
        assert int(ids[-1]) == gen.eos_token_id
