"""`kind: gguf_adapter`: the LoRA adapter as a GGUF adapter (llama.cpp's convert_lora_to_gguf.py) beside an F16
GGUF of the unmerged base, run through the quantize stage on the tiny Llama: llama.cpp with the adapter must
give what the merged model gives, and the Modelfile serves base + ADAPTER."""
from __future__ import annotations

import json

import pytest

from _gguf_families import drift, gguf_logits, hf_logits
from _quantize_helpers import build_upstream
from test_quantize import run_quantize, write_recipe

# llama.cpp base F16 + F16 adapter against the merged model (float32 merge), on the golden conversation.
# Measured: KLD 2.0e-8 and full top-1 agreement vs transformers' merged model (1.4e-8 vs the merged F16 GGUF);
# the base alone is 1.8e-2 away. (The tiny model's distributions are flat: top-1 counts where one token leads.)
MAX_KLD = 1e-3
MIN_TOP1 = 0.99


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-adapter")
    recipe = write_recipe(tmp, tiny_model_dir, "lora", quantize={"merge": True, "targets": [
        {"kind": "gguf", "types": ["F16"]}, {"kind": "gguf_adapter"}]})
    build_upstream(recipe, tiny_model_dir, adapter_scale=0.5)
    proc = run_quantize(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = tmp / "runs" / "lora" / "quantize"
    return {"dir": d, "manifest": json.loads((d / "manifest.json").read_text()), "stdout": proc.stdout, "recipe": recipe}


def test_adapter_artifact_in_the_manifest(adapter_run):
    arts = {a["name"]: a for a in adapter_run["manifest"]["results"]["artifacts"]}
    assert list(arts) == ["merged", "gguf:F16", "gguf_adapter"]
    a = arts["gguf_adapter"]
    assert a["format"] == "gguf-lora" and a["parent"] == "adapter"
    assert a["path"] == "gguf_adapter/adapter-F16.gguf" and a["base_path"] == "gguf_adapter/base-F16.gguf"
    assert a["lora_alpha"] == 8.0 and a["template_family"] == "chatml"
    assert a["lora_check"]["kld_vs_adapter"] < a["lora_check"]["kld_base_alone"] / 100
    files = adapter_run["manifest"]["files"]
    for rel in (a["path"], a["base_path"], "gguf_adapter/Modelfile"):
        assert rel in files and len(files[rel]["sha256"]) == 64


def test_adapter_gguf_is_a_lora_of_the_unmerged_base(adapter_run):
    from quantize.gguf_export import gguf_summary

    d = adapter_run["dir"] / "gguf_adapter"
    lora, base = gguf_summary(d / "adapter-F16.gguf"), gguf_summary(d / "base-F16.gguf")
    assert lora["fields"]["adapter.type"] == "lora"
    assert base["fields"]["general.name"] == "lora"
    assert base["fields"]["tokenizer.ggml.eot_token_id"] == base["fields"]["tokenizer.ggml.eos_token_id"]
    assert "{% generation %}" not in base["fields"]["tokenizer.chat_template"]
    # the base GGUF is the base, not the merged model
    assert base["tensor_bytes"] == gguf_summary(adapter_run["dir"] / "gguf" / "model-F16.gguf")["tensor_bytes"]


def test_adapter_on_base_in_llama_cpp_gives_the_merged_model(adapter_run, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import hf_chat_ids

    q = adapter_run["dir"]
    ids = hf_chat_ids(AutoTokenizer.from_pretrained(q / "merged"), golden_conversation())
    merged = hf_logits(q / "merged", ids)
    with_lora = gguf_logits(q / "gguf_adapter" / "base-F16.gguf", ids, tmp_path / "a.npy",
                            lora=q / "gguf_adapter" / "adapter-F16.gguf")
    base_alone = gguf_logits(q / "gguf_adapter" / "base-F16.gguf", ids, tmp_path / "b.npy")
    merged_gguf = gguf_logits(q / "gguf" / "model-F16.gguf", ids, tmp_path / "c.npy")
    d = drift(merged, with_lora, decided=0.1)
    print(f"adapter on base (llama.cpp) vs merged (transformers): {d}; "
          f"vs merged GGUF: {drift(merged_gguf, with_lora, decided=0.1)}; base alone: {drift(merged, base_alone)}")
    assert d["kld"] <= MAX_KLD and d["top1"] >= MIN_TOP1 and d["decided"] >= 5, d
    assert drift(merged_gguf, with_lora)["kld"] <= MAX_KLD
    assert drift(merged, base_alone)["kld"] > 100 * d["kld"]  # the adapter is really applied


def test_modelfile_serves_the_base_with_the_adapter(adapter_run):
    from quantize.ollama_template import golden_conversation, parse_modelfile, render_modelfile_prompt

    text = (adapter_run["dir"] / "gguf_adapter" / "Modelfile").read_text()
    assert text.startswith("FROM ./base-F16.gguf\nADAPTER ./adapter-F16.gguf\n")
    mf = parse_modelfile(text)
    assert mf["from"] == "./base-F16.gguf" and mf["adapter"] == "./adapter-F16.gguf" and "<|im_end|>" in mf["stop"]
    assert render_modelfile_prompt(text, golden_conversation()).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("cfg, message", [
    ({"use_dora": True}, "DoRA adapter cannot be served"),
    ({"use_rslora": True}, "rsLoRA"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"),
])
def test_adapters_llama_cpp_would_scale_differently_are_refused(tmp_path, cfg, message):
    from quantize.stage import lora_problem
    from workbench.workspace import StageError

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **cfg}))
    with pytest.raises(StageError, match=message):
        lora_problem(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    lora_problem(tmp_path)


def test_pull_serves_the_adapter_with_llama_server_lora_and_the_modelfile(tmp_path):
    from registry.pull import available_formats, format_paths, launch_lines

    files = {"gguf_adapter/base-F16.gguf": {}, "gguf_adapter/adapter-F16.gguf": {}, "gguf_adapter/Modelfile": {},
             "gguf/model-F16.gguf": {}}
    assert "gguf_adapter" in available_formats(files) and format_paths("gguf_adapter", files) == ["gguf_adapter/"]
    lines = launch_lines("Tiny", None, "gguf_adapter", tmp_path)
    d = tmp_path / "gguf_adapter"
    assert f"llama-server -m {d / 'base-F16.gguf'} --lora {d / 'adapter-F16.gguf'} --jinja" in lines
    assert f"ollama create tiny -f {d / 'Modelfile'}" in lines


def test_gate_runs_the_adapter_artifact_as_llama_server_would(adapter_run, tmp_path):
    """The gate reads the gguf-lora artifact (base + adapter, parent: the adapter on the base in transformers)
    and its llama.cpp worker applies the adapter: its log-probs are those of the PEFT adapter on the base."""
    import numpy as np

    from eval_gate.engines import run_gguf
    from eval_gate.inputs import load_inputs
    from quantize.ollama_template import golden_conversation
    from recipes import load_recipe
    from workbench.workspace import Workspace

    recipe = load_recipe(adapter_run["recipe"])
    inp = load_inputs(recipe, Workspace(recipe))
    art = next(a for a in inp.artifacts if a.name == "gguf_adapter")
    assert (art.format, art.parent, art.quant_type, art.lora_base.name) == ("gguf-lora", "adapter", "F16", "base-F16.gguf")
    ids = [i for r in inp.records for i in r][:64]
    job = {"threads": 1, "n_ctx": 256, "records": [ids],
           "chats": {"golden": {"conversations": [golden_conversation()], "max_new_tokens": 4, "timed": True}}}
    ref = hf_logits(inp.base_dir, ids, adapter_dir=inp.adapter_dir)
    with_lora = run_gguf(art.lora_base, art.name, {**job, "lora_path": str(art.path)}, tmp_path / "a", 600)
    alone = run_gguf(art.lora_base, "base", job, tmp_path / "b", 600)
    d_lora = drift(ref, np.load(with_lora.logprobs_path).astype(np.float64))
    d_alone = drift(ref, np.load(alone.logprobs_path).astype(np.float64))
    assert d_lora["kld"] <= MAX_KLD and d_alone["kld"] > 100 * d_lora["kld"], (d_lora, d_alone)
    assert with_lora.chat_template and len(with_lora.answers["golden"]) == 1
