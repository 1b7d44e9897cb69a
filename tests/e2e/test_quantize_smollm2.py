"""The quantize stage on the real SmolLM2: its Q8_0 GGUF answers like the merged model, through the same template."""
from __future__ import annotations

import pytest

from _quantize_helpers import CHATML_DEFAULT_SYSTEM_TEMPLATE, build_upstream, run_quantize, write_recipe


@pytest.mark.e2e
def test_smollm2_q8_0_answers_like_the_merged_model(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    from quantize.ollama_template import golden_conversation
    from quantize.parity import greedy_gguf, greedy_hf, hf_chat_ids, template_parity

    recipe = write_recipe(tmp_path, smollm2_dir, "smol",
                          quantize={"merge": True, "targets": [{"kind": "gguf", "types": ["F16", "Q8_0"]}]})
    # the train stage's kind of template: whitespace control, {%- generation -%}, a default system turn
    build_upstream(recipe, smollm2_dir, adapter_scale=0.01, chat_template=CHATML_DEFAULT_SYSTEM_TEMPLATE)
    proc = run_quantize(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = tmp_path / "runs" / "smol" / "quantize"
    tok = AutoTokenizer.from_pretrained(d / "merged")
    q8 = d / "gguf" / "model-Q8_0.gguf"
    modelfile = (d / "gguf" / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful assistant for the Python standard library."""' in modelfile
    for conv in (golden_conversation(), golden_conversation()[1:]):  # with and without a system turn
        parity = template_parity(tok, q8, modelfile, conv)
        assert parity["mismatches"] == []
    prompt = parity["ids"]["hf"]
    n = 12
    merged = greedy_hf(d / "merged", prompt, n)
    assert greedy_gguf(q8, prompt, n) == merged[:n], tok.decode(merged)
