"""The stdlib Q&A recipe's gate on the real SmolLM2 (shipped golden, red-team and over-refusal sets, its thresholds)."""
from __future__ import annotations

from pathlib import Path

import pytest

from _eval_gate_helpers import (CANARIES, build_candidate, checks_of, domain_text, run_gate, train_lora, write_jsonl,
                                write_recipe)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_stdlib_qa_honest_candidate_passes_on_smollm2(tmp_path, smollm2_dir, run_cli):
    """recipes/stdlib-qa.yaml's gate on SmolLM2 with a lightly trained adapter: the honest candidate passes, golden
    set included (that recipe asks for no gain over the base: its fine-tunes do not beat it). transformers
    artifacts only: the GGUF side is covered on the tiny model in tests/unit/eval_gate/."""
    adapter = train_lora(smollm2_dir, tmp_path / "adapter", [domain_text(i) for i in range(16)], steps=10, lr=1e-4)
    canaries = write_jsonl(tmp_path / "canaries.jsonl", CANARIES)
    recipe = write_recipe(tmp_path, "qa-e2e", smollm2_dir, source=REPO / "recipes" / "stdlib-qa.yaml",
                          eval_gate={"safety": {"canaries": str(canaries)}})
    build_candidate(recipe, adapter)
    proc, verdict, out = run_gate(run_cli, recipe)
    assert proc.returncode == 0, proc.stderr
    for art in ("adapter", "merged"):
        assert checks_of(verdict, "golden_pass_rate")[art]["passed"]
        assert checks_of(verdict, "golden_critical_failures")[art]["value"] == 0
        assert checks_of(verdict, "perplexity_gain")[art]["passed"]
    assert "PASSED" in (out / "report.md").read_text()
