"""Merge a PEFT adapter into the unquantized base, in float32, and check the merge changed nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from workbench.workspace import StageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str, tolerance: float) -> dict:
    """Write base+adapter merged to out_dir (save_pretrained + the adapter's tokenizer and generation config).

    The merge always happens in float32 on the full-precision base, whatever the adapter was trained against
    (a QLoRA adapter is merged into the unquantized base, never into 4-bit weights). Returns the logit check.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type") not in ("LORA",):
        raise StageError(f"{adapter_dir}/adapter_config.json: peft_type {cfg.get('peft_type')!r} cannot be merged (LoRA/DoRA only)")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        raise StageError(f"{adapter_dir}: tokenizer has {len(tokenizer)} tokens, more than the base's embeddings")
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    model.eval()

    # a probe that goes through the chat template: the tokens the adapter was trained on
    probe_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which module parses command-line arguments?"}], tokenize=False,
        add_generation_prompt=True) + "The argparse module."
    probe = tokenizer(probe_text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        adapted_logits = model(probe).logits
        merged = model.merge_and_unload()
        merged_logits = merged(probe).logits
    max_diff = float((adapted_logits - merged_logits).abs().max())
    if not max_diff <= tolerance:
        raise StageError(f"{adapter_dir}: merged logits differ from base+adapter by {max_diff:.3g} > "
                         f"quantize.merge_check_tolerance {tolerance}")

    merged = merged.to(getattr(torch, dtype))
    merged.config.dtype = dtype
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    for name in ("generation_config.json", "chat_template.jinja"):
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, out_dir / name)  # the adapter's, not the base's
    return {"max_abs_logit_diff": max_diff, "tolerance": tolerance, "probe_tokens": int(probe.shape[1])}
