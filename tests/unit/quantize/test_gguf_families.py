"""GGUF through llama.cpp's own converter for each family teams fine-tune (Llama, Mistral, Qwen2, Qwen3,
Gemma 3, Phi-3): a tiny random model of each is converted to F16 and quantized to Q8_0, loaded by llama.cpp,
and must give transformers' next-token distributions on the same tokens; its own chat template must give the
same token ids through HF, the GGUF and the Modelfile. A model the converter refuses fails with the
converter's own reason."""
from __future__ import annotations

from pathlib import Path

import pytest

from _gguf_families import FAMILIES, build_family_model, drift, gguf_logits, hf_logits, prompt_ids

# Limits on the drift of llama.cpp from transformers (float32) over ~40 positions of a fixed prompt. Measured
# over the six families (mean KLD / top-1 agreement): F16 1.4e-6..2.7e-6 / 1.0; Q8_0 6.1e-4..1.6e-3 /
# 0.964..1.0 (a random model has near-ties, so top-1 is counted where transformers' best token leads the
# runner-up by DECIDED nats: 28-32 of the ~40 positions).
DECIDED = 0.1
LIMITS = {"F16": {"max_kld": 1e-4, "min_top1": 0.99}, "Q8_0": {"max_kld": 1e-2, "min_top1": 0.9}}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}


@pytest.fixture(scope="module")
def converted(smollm2_dir, tmp_path_factory):
    """family name -> {dir, tokenizer, ollama template, F16 and Q8_0 paths}, built on first use."""
    from transformers import AutoTokenizer

    from quantize.ollama_template import ollama_template_for
    from workbench.chat import strip_generation_markers
    from quantize.gguf_export import write_f16_gguf
    from quantize.llama_ops import run_llama

    root = tmp_path_factory.mktemp("gguf-families")
    cache = Path(__file__).resolve().parents[3] / ".cache" / "tests"
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            model_dir = build_family_model(FAMILIES[name], root / name, smollm2_dir, cache)
            tok = AutoTokenizer.from_pretrained(model_dir)
            tmpl = ollama_template_for(tok)
            f16, q8 = root / f"{name}-F16.gguf", root / f"{name}-Q8_0.gguf"
            write_f16_gguf(model_dir, f16, strip_generation_markers(tok.chat_template), name="tiny",
                           eot_token=tmpl.stop[0])
            run_llama("quantize", f16, output=str(q8), type="Q8_0")
            done[name] = {"dir": model_dir, "tok": tok, "tmpl": tmpl, "F16": f16, "Q8_0": q8, "root": root}
        return done[name]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_gives_transformers_next_token_distributions(converted, family, tmp_path):
    from quantize.gguf_export import gguf_summary

    c = converted(family)
    ids = prompt_ids(c["tok"])
    ref = hf_logits(c["dir"], ids)
    for gtype, limit in LIMITS.items():
        d = drift(ref, gguf_logits(c[gtype], ids, tmp_path / f"{gtype}.npy"), decided=DECIDED)
        print(f"{family} {gtype}: KLD {d['kld']:.2e}, top-1 {d['top1']:.3f} on {d['decided']}/{d['positions']}")
        assert d["decided"] >= 10, d
        assert d["kld"] <= limit["max_kld"] and d["top1"] >= limit["min_top1"], (family, gtype, d)
    fields = gguf_summary(c["F16"])["fields"]
    assert fields["general.architecture"] == ARCH[family]
    assert fields["tokenizer.ggml.eot_token_id"] == c["tok"].convert_tokens_to_ids(c["tmpl"].stop[0])
    assert fields["tokenizer.ggml.eos_token_id"] == c["tok"].eos_token_id


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_template_has_the_same_tokens_through_hf_gguf_and_modelfile(converted, family):
    from quantize.ollama_template import golden_conversation, modelfile_text
    from quantize.parity import template_parity
    from quantize.stage import modelfile_template

    c = converted(family)
    assert c["tmpl"].family == FAMILIES[family].go_family
    modelfile = modelfile_text(c["F16"].name, modelfile_template(c["tmpl"], c["F16"]), {})
    for conv in (golden_conversation(), golden_conversation()[1:]):  # with and without a system turn
        parity = template_parity(c["tok"], c["Q8_0"], modelfile, conv)
        assert parity["mismatches"] == [], (family, parity["gguf_prompt"])
        assert len(parity["ids"]["hf"]) > 40


def test_phi3_needs_its_name_in_the_gguf(converted, tmp_path):
    """llama.cpp gives Phi-3's special tokens their strip-the-newline-after attribute only when general.name says
    phi-3: the stage's name keeps saying it, and without it the tokens differ from HF's."""
    from _quantize_helpers import rewrite_gguf

    from quantize.ollama_template import golden_conversation
    from quantize.gguf_export import gguf_summary, llama_cpp_name
    from quantize.parity import template_parity

    c = converted("phi3")
    assert gguf_summary(c["F16"])["fields"]["general.name"] == llama_cpp_name("tiny", "phi3") == "tiny (phi-3)"
    assert llama_cpp_name("tiny", "llama") == "tiny" and llama_cpp_name("my-phi3", "phi3") == "my-phi3"
    renamed = tmp_path / "renamed.gguf"
    rewrite_gguf(c["F16"], renamed, {"general.name": "tiny"})
    parity = template_parity(c["tok"], renamed, "TEMPLATE \"\"\"{{ .Prompt }}\"\"\"\n", golden_conversation())
    assert parity["mismatches"] and parity["mismatches"][0].startswith("gguf_template")


def test_architecture_the_converter_refuses_names_the_model_and_quotes_it(smollm2_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from quantize.gguf_convert import convert_hf_to_gguf
    from workbench.workspace import StageError

    model_dir = tmp_path / "opt"
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                             word_embed_proj_dim=32, max_position_embeddings=64)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(model_dir)
    with pytest.raises(StageError) as err:
        convert_hf_to_gguf(model_dir, tmp_path / "opt.gguf")
    msg = str(err.value)
    assert str(model_dir) in msg and "convert_hf_to_gguf.py" in msg and "Model OPTForCausalLM is not supported" in msg
    assert not (tmp_path / "opt.gguf").exists()


def test_tokenizer_the_converter_cannot_reproduce_is_refused(converted, smollm2_dir, tmp_path):
    """A Qwen2 model whose vocabulary is not Qwen2's: transformers splits its text with Qwen2's regex, which
    llama.cpp knows only on Qwen2's vocabulary, so the converter refuses rather than writing a GGUF that
    would tokenize differently."""
    import shutil

    from transformers import AutoTokenizer

    from quantize.gguf_convert import vocab_only_gguf
    from workbench.workspace import StageError

    model_dir = tmp_path / "qwen2-other-vocab"
    model_dir.mkdir()
    shutil.copy2(converted("qwen2")["dir"] / "config.json", model_dir / "config.json")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(model_dir)
    with pytest.raises(StageError, match="BPE pre-tokenizer was not recognized") as err:
        vocab_only_gguf(model_dir, tmp_path / "vocab.gguf")
    assert str(model_dir) in str(err.value)


def test_recipe_with_each_family_validates(make_recipe, converted):
    from recipes import load_recipe

    for family in FAMILIES:
        path = make_recipe(base_dir=converted(family)["dir"], name=f"v-{family}", quantize={"targets": [
            {"kind": "gguf", "types": ["F16", "Q8_0"]}, {"kind": "gguf_adapter"},
            {"kind": "awq", "calibration_samples": 8}]})
        assert [t.kind for t in load_recipe(path).quantize.targets] == ["gguf", "gguf_adapter", "awq"]


def test_awq_group_size_is_checked_at_validation(make_recipe, converted):
    """A group size must divide every Linear input width, the output projection's (heads x head_dim, which
    Gemma 3 and Qwen3 set apart from hidden_size) included; a bad one fails at validation."""
    from quantize.awq import choose_group_size
    from recipes import RecipeError, load_recipe
    from workbench.workspace import StageError

    head_dim_apart = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 3, "head_dim": 32}
    with pytest.raises(StageError, match=r"width\(s\) \[96\]"):
        choose_group_size(head_dim_apart, 128)  # divides hidden and intermediate, not o_proj's 3 x 32
    assert choose_group_size(head_dim_apart, None) == 32
    path = make_recipe(base_dir=converted("mistral")["dir"], name="g", quantize={"targets": [
        {"kind": "awq", "group_size": 128}]})
    with pytest.raises(RecipeError, match=r"group_size 128 does not divide the model's Linear input width\(s\) \[64\]"):
        load_recipe(path)
    path = make_recipe(base_dir=converted("mistral")["dir"], name="g2", quantize={"targets": [
        {"kind": "awq", "group_size": 32}]})
    assert load_recipe(path).quantize.targets[0].group_size == 32
