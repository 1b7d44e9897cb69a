"""The quantize stage: recipe validation, merge, GGUF (+ Modelfile) and AWQ outputs, template/stop-token parity,
and native llama.cpp aborts turned into clear errors. Most tests share one run on the tiny 2-layer Llama."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _quantize_helpers import CHATML_TEMPLATE, build_upstream, rewrite_gguf, run_quantize, write_recipe

@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """Every target kind (F16, Q8_0, Q4_K_M, AWQ) run once on the tiny Llama with a random LoRA adapter."""
    tmp = tmp_path_factory.mktemp("quantize-tiny")
    recipe = write_recipe(tmp, tiny_model_dir, "tiny", quantize={"merge": True, "targets": [
        {"kind": "gguf", "types": ["F16", "Q8_0", "Q4_K_M"]},
        {"kind": "awq", "calibration_samples": 32, "calibration_max_len": 256}]})
    build_upstream(recipe, tiny_model_dir, adapter_scale=0.5)
    proc = run_quantize(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from recipes import load_recipe
    from workbench.workspace import Workspace

    ws = Workspace(load_recipe(recipe))
    return {"recipe": recipe, "dir": ws.stage_dir("quantize"), "manifest": ws.manifest("quantize"),
            "stdout": proc.stdout, "ws": ws}


# ---- recipe validation: refused before any stage runs ---------------------------------------------------

def test_validate_refuses_autoawq_and_points_to_llm_compressor(make_recipe, tiny_model_dir, run_cli):
    path = make_recipe(base_dir=tiny_model_dir, quantize={"targets": [{"kind": "awq", "engine": "autoawq"}]})
    proc = run_cli("-m", "workbench", "validate", str(path))
    assert proc.returncode == 2
    assert "quantize.targets.0.engine" in proc.stderr
    assert "llm-compressor" in proc.stderr and "archived" in proc.stderr
    line = int(proc.stderr.split(f"{path}:", 1)[1].split(":", 1)[0])
    assert "engine" in path.read_text().splitlines()[line - 1]


@pytest.mark.parametrize("types, message", [
    (["F16", "Q4_K_X"], "unknown GGUF type(s) 'Q4_K_X'"),
    (["Q8_0"], "must include F16"),
    (["F16", "Q8_0", "Q8_0"], "listed twice: Q8_0"),
])
def test_validate_refuses_bad_gguf_types(make_recipe, tiny_model_dir, types, message):
    from recipes import RecipeError, load_recipe

    path = make_recipe(base_dir=tiny_model_dir, quantize={"targets": [{"kind": "gguf", "types": types}]})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value) and "quantize.targets.0.types" in str(err.value)


def test_gguf_types_put_f16_first(make_recipe, tiny_model_dir):
    from recipes import load_recipe

    path = make_recipe(base_dir=tiny_model_dir, quantize={"targets": [{"kind": "gguf", "types": ["Q4_K_M", "F16"]}]})
    assert load_recipe(path).quantize.targets[0].types == ["F16", "Q4_K_M"]


@pytest.mark.parametrize("config, needs_awq, problem", [
    ({"architectures": ["LlamaForCausalLM"]}, True, None),
    ({"architectures": ["Qwen2ForCausalLM"]}, True, None),
    ({"architectures": ["MistralForCausalLM"]}, True, None),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn"}}, True, None),
    ({"architectures": ["GPT2LMHeadModel"]}, False, None),  # llama.cpp's converter has GPT-2 ...
    ({"architectures": ["GPT2LMHeadModel"]}, True, "'GPT2LMHeadModel' is not supported by llm-compressor's AWQ"),  # AWQ not
    ({"architectures": ["OPTForCausalLM"]}, False, "'OPTForCausalLM' is not supported by llama.cpp's convert_hf_to_gguf.py"),
])
def test_architecture_problem(config, needs_awq, problem):
    from recipes.sections.quantize import architecture_problem

    found = architecture_problem(config, needs_gguf=True, needs_awq=needs_awq)
    assert (found is None) if problem is None else (problem in found)


def test_unsupported_architecture_fails_before_any_work(tmp_path, smollm2_dir):
    """An OPT base (llama.cpp's converter has no OPT): refused when the recipe is loaded (so by `wb validate`
    too), before any stage work."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = tmp_path / "opt-base"
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256)).save_pretrained(base)
    tok.save_pretrained(base)
    recipe = write_recipe(tmp_path, base, "opt")
    proc = run_quantize(recipe)
    assert proc.returncode == 2
    assert "base_model: base model architecture 'OPTForCausalLM' is not supported" in proc.stderr
    assert "convert_hf_to_gguf.py" in proc.stderr
    assert not (tmp_path / "runs" / "opt").exists()


def test_untranslatable_chat_template_fails_before_any_work(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, "inst")
    build_upstream(recipe, tiny_model_dir, chat_template="{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    proc = run_quantize(recipe)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "matches no Ollama template family" in proc.stderr and "adapter" in proc.stderr
    assert not (tmp_path / "runs" / "inst" / "quantize").exists()


# ---- the stage's outputs ----------------------------------------------------------------------------------

def test_outputs_follow_the_stage_contract(tiny_run):
    d, results = tiny_run["dir"], tiny_run["manifest"]["results"]
    arts = {a["name"]: a for a in results["artifacts"]}
    assert list(arts) == ["merged", "gguf:F16", "gguf:Q8_0", "gguf:Q4_K_M", "awq"]
    for a in arts.values():
        assert (d / a["path"]).exists(), a["path"]
        assert a["size_bytes"] > 0 and a["seconds"] > 0 and a["peak_rss_mb"] > 0
        assert set(a) >= {"name", "format", "path", "parent", "bits_per_weight", "size_bytes", "seconds", "peak_rss_mb"}
    assert arts["merged"]["parent"] is None and arts["awq"]["parent"] == "merged"
    assert arts["merged"]["merge_check"]["max_abs_logit_diff"] <= arts["merged"]["merge_check"]["tolerance"]
    # every file is hashed in the manifest, the GGUFs and the Modelfile included
    files = tiny_run["manifest"]["files"]
    for rel in ("gguf/model-F16.gguf", "gguf/model-Q8_0.gguf", "gguf/model-Q4_K_M.gguf", "gguf/Modelfile",
                "merged/model.safetensors", "merged/chat_template.jinja", "awq/config.json"):
        assert rel in files and len(files[rel]["sha256"]) == 64
    assert tiny_run["manifest"]["inputs"]["train"]["manifest"]["stage"] == "train"
    # calibration is the recipe's cleaned train split (10 records), identified by a digest
    calib = arts["awq"]["calibration"]
    assert calib["source"] == "clean/train" and calib["samples"] == 10 and len(calib["sha256"]) == 64
    assert arts["awq"]["group_size"] == 64 and arts["awq"]["quantizer"]["llmcompressor"] == "0.14.0.1"


def test_bits_per_weight_are_read_from_the_files(tiny_run):
    from quantize.gguf_export import gguf_summary

    arts = {a["name"]: a for a in tiny_run["manifest"]["results"]["artifacts"]}
    assert 15.9 < arts["gguf:F16"]["bits_per_weight"] < 16.1
    assert 8.4 < arts["gguf:Q8_0"]["bits_per_weight"] < 8.6
    # the tiny model's 64/128 columns are not multiples of 256: Q4_K_M falls back to other types, and says so
    q4 = gguf_summary(tiny_run["dir"] / "gguf" / "model-Q4_K_M.gguf")
    assert q4["bits_per_weight"] == arts["gguf:Q4_K_M"]["bits_per_weight"]
    assert "Q4_K" not in q4["tensor_types"] and arts["gguf:Q4_K_M"]["tensor_types"] == q4["tensor_types"]
    assert arts["gguf:Q4_K_M"]["bits_per_weight"] < arts["gguf:Q8_0"]["bits_per_weight"]
    assert 4.0 < arts["awq"]["bits_per_weight"] < 5.0
    assert arts["gguf:Q8_0"]["size_ratio_vs_f16"] < 0.7


def test_gguf_carries_tokenizer_specials_and_template(tiny_run):
    from transformers import AutoTokenizer

    from quantize.gguf_export import gguf_summary

    tok = AutoTokenizer.from_pretrained(tiny_run["dir"] / "merged")
    fields = gguf_summary(tiny_run["dir"] / "gguf" / "model-Q8_0.gguf")["fields"]
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    # the adapter's template, minus transformers' {% generation %} markers that llama.cpp cannot parse
    assert "{% generation %}" not in fields["tokenizer.chat_template"]
    assert fields["tokenizer.chat_template"] == CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def test_modelfile_has_template_stops_and_parameters(tiny_run):
    from quantize.ollama_template import parse_modelfile

    mf = parse_modelfile((tiny_run["dir"] / "gguf" / "Modelfile").read_text())
    smallest = min(("F16", "Q8_0", "Q4_K_M"), key=lambda t: (tiny_run["dir"] / "gguf" / f"model-{t}.gguf").stat().st_size)
    assert mf["from"] == f"./model-{smallest}.gguf"
    assert "<|im_end|>" in mf["stop"] and "{{ .Content }}" in mf["template"]
    # generation_config.json of the adapter: greedy, 64 new tokens
    assert mf["parameters"]["temperature"] == "0" and mf["parameters"]["num_predict"] == "64"


def test_every_gguf_loads_and_answers_the_golden_conversation(tiny_run):
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import greedy_gguf, hf_chat_ids

    tok = AutoTokenizer.from_pretrained(tiny_run["dir"] / "merged")
    prompt = hf_chat_ids(tok, golden_conversation())
    for t in ("F16", "Q8_0", "Q4_K_M"):
        ids = greedy_gguf(tiny_run["dir"] / "gguf" / f"model-{t}.gguf", prompt, 6)
        assert len(ids) >= 1 and all(0 <= i < len(tok) for i in ids)


def test_merge_check_refuses_a_merge_outside_its_tolerance(tiny_run, tiny_model_dir, tmp_path):
    """The merge is compared with base+adapter on a probe; beyond the tolerance it is an error, nothing written."""
    from quantize.merge import merge_adapter
    from workbench.workspace import StageError

    adapter = tiny_run["ws"].stage_dir("train") / "adapter"
    diff = tiny_run["manifest"]["results"]["artifacts"][0]["merge_check"]["max_abs_logit_diff"]
    assert diff > 0  # float32 op order differs after merging: the check measures something
    with pytest.raises(StageError, match=r"merged logits differ from base\+adapter by .* > quantize.merge_check_tolerance"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", "float32", tolerance=diff / 10)
    assert not (tmp_path / "merged").exists()


def test_awq_output_loads_in_transformers_and_generates(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import hf_chat_ids

    awq_dir = tiny_run["dir"] / "awq"
    qcfg = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["group_size"] == 64 and weights["symmetric"] is False
    tok = AutoTokenizer.from_pretrained(awq_dir)
    model = AutoModelForCausalLM.from_pretrained(awq_dir)
    merged = AutoModelForCausalLM.from_pretrained(tiny_run["dir"] / "merged", dtype=torch.float32)
    ids = torch.tensor([hf_chat_ids(tok, golden_conversation())])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
        q_logits, m_logits = model(ids).logits.float(), merged(ids).logits
    assert out.shape[1] > ids.shape[1]
    # 4-bit weights: close to the merged model, not garbage (corrupt weights give uncorrelated logits)
    corr = torch.corrcoef(torch.stack([q_logits.flatten(), m_logits.flatten()]))[0, 1]
    assert corr > 0.9, corr


def test_rerun_is_skipped_when_up_to_date(tiny_run):
    proc = run_quantize(tiny_run["recipe"])
    assert proc.returncode == 0 and "up to date" in proc.stdout


# ---- template and stop-token parity --------------------------------------------------------------------------

def test_golden_conversation_has_the_same_token_ids_everywhere(tiny_run):
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import template_parity

    d = tiny_run["dir"]
    tok = AutoTokenizer.from_pretrained(d / "merged")
    conv = golden_conversation()
    parity = template_parity(tok, d / "gguf" / "model-Q8_0.gguf", (d / "gguf" / "Modelfile").read_text(), conv)
    assert parity["mismatches"] == []
    ids = parity["ids"]
    direct = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids["hf"] == direct == ids["gguf_template"] == ids["modelfile_template"]
    # every turn's stop token is there, and the prompt ends by opening the assistant turn
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids["hf"].count(im_end) == len(conv)
    assert tok.decode(ids["hf"], skip_special_tokens=False).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("wrong", [
    CHATML_TEMPLATE.replace("message['role'] + '\n'", "message['role'] + ' '"),    # role line joined with content
    CHATML_TEMPLATE.replace("'<|im_end|>' }}{% endgeneration %}", "'<|endoftext|>' }}{% endgeneration %}"),  # wrong stop
    CHATML_TEMPLATE.replace("{% for message in messages %}", "{% for message in messages[1:] %}"),  # drops a turn
])
def test_wrong_gguf_template_is_caught(tiny_run, tmp_path, wrong):
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import template_parity

    assert wrong != CHATML_TEMPLATE
    d = tiny_run["dir"]
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(d / "gguf" / "model-Q8_0.gguf", bad, {"tokenizer.chat_template": wrong})
    tok = AutoTokenizer.from_pretrained(d / "merged")
    parity = template_parity(tok, bad, (d / "gguf" / "Modelfile").read_text(), golden_conversation())
    assert len(parity["mismatches"]) == 1 and parity["mismatches"][0].startswith("gguf_template")


@pytest.mark.parametrize("old, new", [
    ("{{ .Role }}\n", "{{ .Role }}\n\n"),
    ("<|im_end|>\n{{ end }}", "<|im_end|>{{ end }}"),
    ("{{ end }}<|im_start|>assistant\n", "{{ end }}<|im_start|>assistant"),
])
def test_wrong_modelfile_template_is_caught(tiny_run, old, new):
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import template_parity

    d = tiny_run["dir"]
    modelfile = (d / "gguf" / "Modelfile").read_text()
    assert old in modelfile
    wrong = modelfile.replace(old, new, 1)
    tok = AutoTokenizer.from_pretrained(d / "merged")
    parity = template_parity(tok, d / "gguf" / "model-F16.gguf", wrong, golden_conversation())
    assert len(parity["mismatches"]) == 1 and parity["mismatches"][0].startswith("modelfile_template")


def test_merged_and_f16_gguf_give_the_same_greedy_answer(tiny_run):
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import greedy_gguf, greedy_hf, hf_chat_ids

    d = tiny_run["dir"]
    tok = AutoTokenizer.from_pretrained(d / "merged")
    prompt = hf_chat_ids(tok, golden_conversation())
    assert greedy_hf(d / "merged", prompt, 8) == greedy_gguf(d / "gguf" / "model-F16.gguf", prompt, 8)


def test_ollama_template_refuses_an_unknown_family(tiny_model_dir):
    from transformers import AutoTokenizer

    from quantize.ollama_template import TemplateMismatch, ollama_template_for

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    with pytest.raises(TemplateMismatch, match="chatml: differs at char 0"):
        ollama_template_for(tok)


def test_default_system_prompt_becomes_modelfile_system(smollm2_dir):
    """SmolLM2's own template inserts a system turn when there is none: Ollama gets it as SYSTEM."""
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation, modelfile_text, ollama_template_for, render_modelfile_prompt

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tmpl = ollama_template_for(tok)
    assert tmpl.family == "chatml" and tmpl.system and "SmolLM" in tmpl.system
    mf = modelfile_text("model-Q8_0.gguf", tmpl, {"temperature": 0})
    for conv in (golden_conversation(), golden_conversation()[1:]):
        assert render_modelfile_prompt(mf, conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_go_template_renderer():
    from quantize.ollama_template import render_go_template

    t = '{{- range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}{{ else }}{{ $.Prefix }}{{ .Content }}{{ end }}\n{{- end }} done'
    data = {"Prefix": "A:", "Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}
    assert render_go_template(t, data) == "U:hiA:yo done"
    with pytest.raises(ValueError, match="missing"):
        render_go_template("{{ range .Messages }}x", data)


# ---- llama.cpp runs in a child: a native abort becomes a clear error -------------------------------------------

def test_native_llama_abort_becomes_a_stage_error_naming_the_file(tiny_run, tmp_path):
    from quantize.llama_ops import run_llama
    from workbench.workspace import StageError

    bad = tmp_path / "bad-tokenizer.gguf"
    # an eos id outside the vocabulary: llama.cpp throws std::out_of_range and aborts the process
    rewrite_gguf(tiny_run["dir"] / "gguf" / "model-F16.gguf", bad, {"tokenizer.ggml.eos_token_id": 10**6})
    with pytest.raises(StageError) as err:
        run_llama("chat_tokens", bad, messages=[{"role": "user", "content": "hi"}])
    msg = str(err.value)
    assert str(bad) in msg and "SIGABRT" in msg and "out_of_range" in msg


def test_unloadable_gguf_is_a_stage_error(tmp_path):
    from quantize.llama_ops import run_llama
    from workbench.workspace import StageError

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(StageError, match="junk.gguf"):
        run_llama("quantize", junk, output=str(tmp_path / "out.gguf"), type="Q8_0")
