"""Choose how to run on this machine: the `auto` knobs of the train section become concrete settings.

On a CUDA GPU the default is the fast path: bf16 weights and compute, conversations packed into rows without
padding (trl's best-fit-decreasing packing + padding_free, so attention sees per-sequence position_ids and no
pad token is ever computed), flash-attention 2 when installed else flex attention, Liger's fused Triton
kernels (RMSNorm, RoPE, SwiGLU) when installed, and no gradient checkpointing when the activations of one
micro-batch fit in memory (recomputing them costs about a third of the step). On CPU: bfloat16 where the CPU has
bfloat16 matrix units (else float32), padded batches, sdpa, no checkpointing.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

from workbench.workspace import StageError


@dataclass
class RunPlan:
    device: str  # "cuda" | "cpu"
    dtype: str  # "bfloat16" | "float32"
    packing: bool
    attention: str
    gradient_checkpointing: bool
    liger_kernels: bool
    compile: bool

    def as_params(self) -> dict:
        return {f"plan.{k}": v for k, v in asdict(self).items()}


def check_machine(section) -> None:
    """Refuse what this machine cannot run, before any work is done."""
    import torch

    if section.method == "qlora" and not torch.cuda.is_available():
        raise StageError(
            "train.method: qlora loads the base in 4-bit with bitsandbytes, which needs a CUDA GPU and none is "
            "visible on this machine; use method: lora (or dora) here, or run on a GPU machine"
        )


def plan_run(section, model_config) -> RunPlan:
    import torch

    check_machine(section)
    cuda = torch.cuda.is_available()
    if section.precision != "auto":
        dtype = section.precision
    elif cuda:
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        dtype = "bfloat16" if cpu_has_bf16_units() else "float32"

    packing = cuda if section.packing == "auto" else section.packing

    if section.attention != "auto":
        attention = section.attention
    elif cuda and importlib.util.find_spec("flash_attn") is not None:
        attention = "flash_attention_2"
    elif cuda:
        attention = "flex_attention"
    else:
        attention = "sdpa"
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise StageError("train.attention: flash_attention_2 needs the flash-attn package, which is not installed")

    liger_installed = importlib.util.find_spec("liger_kernel") is not None
    if section.liger_kernels == "auto":
        liger = cuda and liger_installed
    else:
        liger = section.liger_kernels
        if liger and not (cuda and liger_installed):
            raise StageError("train.liger_kernels: true needs a CUDA GPU and the liger-kernel package")

    if section.gradient_checkpointing == "auto":
        checkpointing = cuda and not _activations_fit(section, model_config, packing)
    else:
        checkpointing = section.gradient_checkpointing

    return RunPlan(
        device="cuda" if cuda else "cpu", dtype=dtype, packing=packing, attention=attention,
        gradient_checkpointing=checkpointing, liger_kernels=liger, compile=section.compile and cuda,
    )


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16): there a bfloat16
    matmul is several times faster than a float32 one; elsewhere it is emulated and slower."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes
        return False


def _activations_fit(section, cfg, packing: bool) -> bool:
    """Rough upper bound of one micro-batch's saved activations (bf16) against free GPU memory.

    Per token and layer a Llama-style block keeps about 16 hidden-sized and 5 intermediate-sized tensors for
    backward with LoRA on every projection (inputs of each adapted matmul, norms, attention output, SwiGLU
    parts). Logits are never materialised: trl computes the loss with a chunked LM head.
    """
    import torch

    tokens = section.batch_size * section.max_seq_len  # padded batches are at most this long, packed rows exactly
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    layers = getattr(cfg, "num_hidden_layers", 32)
    per_token = layers * (16 * hidden + 5 * inter) * 2
    free, _total = torch.cuda.mem_get_info()
    weights = 2 * _param_estimate(cfg)
    return weights + tokens * per_token < 0.8 * free


def _param_estimate(cfg) -> int:
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    layers = getattr(cfg, "num_hidden_layers", 32)
    vocab = getattr(cfg, "vocab_size", 32000)
    heads = getattr(cfg, "num_attention_heads", 32)
    kv = getattr(cfg, "num_key_value_heads", heads)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    attn = hidden * head_dim * (2 * heads + 2 * kv)
    return layers * (attn + 3 * hidden * inter) + vocab * hidden


def check_fast_path(plan: RunPlan) -> list[str]:
    """Notes for the console when the GPU runs without a piece of the fast path."""
    notes = []
    if plan.device == "cuda":
        if importlib.util.find_spec("liger_kernel") is None:
            notes.append("liger-kernel is not installed: pip install liger-kernel for fused RMSNorm/RoPE/SwiGLU")
        if plan.attention == "flex_attention":
            notes.append("flash-attn is not installed: using flex attention")
    return notes
