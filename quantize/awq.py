"""W4A16 weight-only quantization with llm-compressor: AWQ (activation-aware scaling, calibrated on the
recipe's own cleaned training data) followed by group-wise 4-bit rounding, saved as compressed-tensors.

`quantize_w4a16(..., use_awq=False)` is the same format without the AWQ transform: the baseline AWQ must beat.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from workbench.workspace import StageError

GROUP_SIZE_CHOICES = (128, 64, 32)


def linear_input_widths(config: dict) -> list[int]:
    """in_features of the Linear layers that get quantized: attention/MLP inputs, the down projection, and
    the output projection (heads x head_dim, which is not the hidden size in Gemma 3 or Qwen3)."""
    hidden, heads = config["hidden_size"], config.get("num_attention_heads")
    widths = [hidden, config["intermediate_size"]]
    if heads:
        o_proj = heads * (config.get("head_dim") or hidden // heads)
        widths += [o_proj] if o_proj not in widths else []
    return widths


def choose_group_size(config: dict, requested: int | None) -> int:
    widths = linear_input_widths(config)
    if requested is not None:
        bad = [w for w in widths if w % requested]
        if bad:
            raise StageError(f"quantize.targets[awq].group_size {requested} does not divide the model's Linear input "
                             f"width(s) {bad}; pick a divisor of {widths} (e.g. 64 for SmolLM2's 576)")
        return requested
    for g in GROUP_SIZE_CHOICES:
        if all(w % g == 0 for w in widths):
            return g
    raise StageError(f"no AWQ group size among {GROUP_SIZE_CHOICES} divides the Linear input widths {widths}; "
                     "set quantize.targets[awq].group_size")


def calibration_set(clean_dir: Path, tokenizer, n_samples: int, max_len: int, seed: int):
    """Token ids of the first n_samples (after a seeded shuffle) of the cleaned train split, rendered with
    the adapter's chat template: the text the fine-tune will actually see. Returns (dataset, sha256 digest)."""
    from datasets import Dataset, load_from_disk

    path = clean_dir / "train"
    if not path.is_dir():
        raise StageError(f"{path}: the clean stage's train split is missing (AWQ calibrates on it)")
    records = load_from_disk(str(path))
    if "messages" not in records.column_names:
        raise StageError(f"{path}: no 'messages' column (columns: {records.column_names})")
    if len(records) == 0:
        raise StageError(f"{path}: empty train split, nothing to calibrate AWQ on")
    records = records.shuffle(seed=seed).select(range(min(n_samples, len(records))))
    ids = []
    for i, rec in enumerate(records):
        text = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        row = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len).input_ids
        if not row:
            raise StageError(f"{path}: calibration record {i} renders to no tokens")
        ids.append(row)
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    return ds, digest


def w4a16_scheme(group_size: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size),
    )


@contextlib.contextmanager
def cpu_safe_pinning():
    """On a CPU-only torch, AWQ's IntermediatesCache.pin_memory() fails with "Cannot access accelerator
    device": pinning page-locks host memory for faster host-to-GPU copies, which do not exist without an
    accelerator. Make exactly that method a no-op, only while no accelerator is present, only for the
    duration of the call."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def quantize_w4a16(model_dir: Path, out_dir: Path, group_size: int, symmetric: bool, calibration=None,
                   use_awq: bool = True, max_len: int = 512) -> None:
    """Quantize the model in model_dir to W4A16 and save compressed-tensors (+ tokenizer) to out_dir."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    quant = QuantizationModifier(config_groups={"group_0": w4a16_scheme(group_size, symmetric)}, ignore=["lm_head"])
    recipe = [AWQModifier(duo_scaling=True), quant] if use_awq else [quant]
    if use_awq and calibration is None:
        raise StageError("AWQ needs a calibration set")
    kwargs = {}
    if calibration is not None:
        kwargs = dict(dataset=calibration, num_calibration_samples=len(calibration), max_seq_length=max_len,
                      shuffle_calibration_samples=False)
    with cpu_safe_pinning():
        oneshot(model=model, recipe=recipe, tokenizer=tokenizer, **kwargs)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    for name in ("generation_config.json", "chat_template.jinja"):
        if (model_dir / name).is_file() and not (out_dir / name).is_file():
            (out_dir / name).write_bytes((model_dir / name).read_bytes())


def compressed_bits_per_weight(out_dir: Path) -> float:
    """Stored bits per quantized weight: packed int4 plus the group scales and zero points, over the
    number of weights in the quantized Linear layers (embeddings/lm_head are left in full precision)."""
    from safetensors import safe_open

    packed_bytes = 0
    n_weights = 0
    for wf in sorted(out_dir.glob("*.safetensors")):
        with safe_open(wf, framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(".weight_packed"):
                    prefix = key[: -len("weight_packed")]
                    shape = f.get_tensor(prefix + "weight_shape").tolist()
                    n_weights += int(shape[0]) * int(shape[1])
                    for part in ("weight_packed", "weight_scale", "weight_zero_point"):
                        if prefix + part in keys:
                            t = f.get_slice(prefix + part)
                            numel = 1
                            for d in t.get_shape():
                                numel *= d
                            packed_bytes += numel * _dtype_bytes(t.get_dtype())
    if n_weights == 0:
        raise StageError(f"{out_dir}: no packed 4-bit weights found in the saved model")
    return round(8 * packed_bytes / n_weights, 4)


def _dtype_bytes(dtype: str) -> int:
    return {"I32": 4, "F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "I64": 8, "F64": 8}.get(dtype, 4)
