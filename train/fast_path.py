"""Choose how to run on this machine: the `auto` knobs of the train section become concrete settings.

On a CUDA GPU the default is the fast path: bf16 weights and compute; conversations packed into rows without
padding (trl's best-fit-decreasing packing + padding_free: per-conversation position_ids and `cu_seq_lens`);
torch's varlen attention (flash-attention-2 kernels inside torch, fed trl's `cu_seq_lens`, no mask) when torch has
it and the GPU is Ampere or newer, else flash-attention 2 when installed, else flex attention; every decoder
layer compiled, with each micro-step padded to a fixed budget of `batch_size x max_seq_len` tokens so that the
compile happens once; Liger's fused kernels (RMSNorm, RoPE, SwiGLU) only when the layers are not compiled
(inductor fuses those itself); no gradient checkpointing when the activations of one micro-step fit in memory
(recomputing them costs about a third of the step). QLoRA layers stay eager. On CPU: bfloat16 where the CPU has
bfloat16 matrix units (else float32), padded batches, sdpa, no compile, no checkpointing.

LoRA dropout is not free: for backward every adapted linear layer keeps its dropped-out input and the dropout
mask, a copy of every adapted input. The plan counts it in the activation estimate (so it can turn checkpointing
on) and reports it as `lora_dropout_extra_mib`; `dropout: 0` drops that memory.
"""
from __future__ import annotations

import importlib.util
import os
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
    compile: bool  # every decoder layer torch.compile'd
    token_budget: int = 0  # tokens every packed micro-step is padded to; 0 = rows keep their own length
    compile_backend: str = ""
    lora_dropout_extra_mib: float = 0.0  # estimated activation memory the LoRA dropout copies add per micro-step

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
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        raise StageError(
            "accelerate was launched with FSDP on a machine without a CUDA GPU: accelerate makes a CPU process group "
            "plain data parallel (MULTI_CPU) and ignores the FSDP settings, so nothing would be sharded; launch with "
            "accelerate_configs/cpu_ddp.yaml on CPUs, fsdp.yaml on GPUs"
        )


def plan_run(section, model_config) -> RunPlan:
    import torch

    from .compiling import compile_backend

    check_machine(section)
    cuda = torch.cuda.is_available()
    if section.precision != "auto":
        dtype = section.precision
    elif cuda:
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        dtype = "bfloat16" if cpu_has_bf16_units() else "float32"

    packing = cuda if section.packing == "auto" else section.packing
    attention = _attention(section, cuda, packing)

    if section.compile == "auto":
        compile_layers = cuda and packing and attention == "varlen" and section.method != "qlora"
    else:
        compile_layers = section.compile
    fixed_budget = packing and compile_layers if section.token_budget == "auto" else section.token_budget
    if fixed_budget and not packing:
        raise StageError("train.token_budget: true pads packed rows to a fixed size; it needs packing (true, or auto "
                         "on a GPU)")

    liger_installed = importlib.util.find_spec("liger_kernel") is not None
    if section.liger_kernels == "auto":
        liger = cuda and liger_installed and not compile_layers
    else:
        liger = section.liger_kernels
        if liger and not (cuda and liger_installed):
            raise StageError("train.liger_kernels: true needs a CUDA GPU and the liger-kernel package")

    element = 4 if dtype == "float32" else 2
    dropout_bytes = _dropout_bytes_per_token(section, model_config, element)
    if section.gradient_checkpointing == "auto":
        checkpointing = cuda and not _activations_fit(section, model_config, dropout_bytes)
    else:
        checkpointing = section.gradient_checkpointing

    return RunPlan(
        device="cuda" if cuda else "cpu", dtype=dtype, packing=packing, attention=attention,
        gradient_checkpointing=checkpointing, liger_kernels=liger, compile=compile_layers,
        token_budget=section.batch_size * section.max_seq_len if fixed_budget else 0,
        compile_backend=compile_backend() if compile_layers else "",
        lora_dropout_extra_mib=round(section.batch_size * section.max_seq_len * dropout_bytes / 2**20, 1),
    )


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX tiles or AVX512-BF16): there a bfloat16
    matmul is several times faster than a float32 one; elsewhere it is emulated and slower."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes
        return False


def _attention(section, cuda: bool, packing: bool) -> str:
    from .attention import torch_has_varlen

    if section.attention == "varlen":
        if not packing:
            raise StageError("train.attention: varlen attends within packed conversations (cu_seq_lens); it needs "
                             "packing (true, or auto on a GPU)")
        if not torch_has_varlen():
            raise StageError("train.attention: varlen needs torch.nn.attention.varlen (torch >= 2.10)")
        return "varlen"
    if section.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise StageError("train.attention: flash_attention_2 needs the flash-attn package, which is not installed")
    if section.attention != "auto":
        return section.attention
    if cuda and packing and torch_has_varlen() and _ampere_or_newer():
        return "varlen"
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention" if cuda else "sdpa"


def _ampere_or_newer() -> bool:
    import torch

    return torch.cuda.get_device_capability() >= (8, 0)  # flash-attention-2 kernels: sm80 and newer


def _dropout_bytes_per_token(section, cfg, element: int) -> int:
    """Bytes per token that LoRA dropout keeps for backward: each adapted linear layer's dropped-out input (one
    element) and its dropout mask (one byte), for every layer. Without dropout peft uses the input itself."""
    if section.dropout == 0:
        return 0
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    heads = getattr(cfg, "num_attention_heads", 32)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inputs = {"o_proj": heads * head_dim, "down_proj": inter}  # every other projection reads the hidden state
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets = names if section.target_modules == "all-linear" else section.target_modules
    width = sum(inputs.get(name, hidden) for name in targets)
    return getattr(cfg, "num_hidden_layers", 32) * width * (element + 1)


def _activations_fit(section, cfg, dropout_bytes: int) -> bool:
    """Rough upper bound of one micro-batch's saved activations (bf16) against free GPU memory.

    Per token and layer a Llama-style block keeps about 16 hidden-sized and 5 intermediate-sized tensors for
    backward with LoRA on every projection (inputs of each adapted matmul, norms, attention output, SwiGLU
    parts), plus the LoRA dropout copies. Logits are never materialised: trl computes the loss with a chunked
    LM head.
    """
    import torch

    tokens = section.batch_size * section.max_seq_len  # padded batches are at most this long, packed rows exactly
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    layers = getattr(cfg, "num_hidden_layers", 32)
    per_token = layers * (16 * hidden + 5 * inter) * 2 + dropout_bytes
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
    """Notes for the console: what the run pays for, and the pieces of the GPU fast path it runs without."""
    notes = []
    if plan.device == "cuda":
        if not plan.compile and importlib.util.find_spec("liger_kernel") is None:
            notes.append("liger-kernel is not installed: pip install liger-kernel for fused RMSNorm/RoPE/SwiGLU")
        if plan.attention == "flex_attention":
            notes.append("torch has no varlen attention for this GPU and flash-attn is not installed: using flex "
                         "attention")
        if plan.lora_dropout_extra_mib:
            notes.append(f"LoRA dropout keeps a copy of every adapted layer's input for backward: about "
                         f"{plan.lora_dropout_extra_mib:.0f} MiB more activations per micro-step; dropout: 0 saves it")
    elif plan.attention == "varlen":
        notes.append("attention: varlen on a CPU runs a reference kernel, one conversation at a time (slow)")
    if plan.compile and not plan.token_budget:
        notes.append("compile without a fixed token budget: every new batch shape compiles the layers again")
    return notes
