"""`train.attention: varlen`: torch's own variable-length attention over packed rows.

trl's padding-free collator gives every packed row the conversation boundaries as `cu_seq_lens_q/k` (int32
offsets, computed on the CPU) and the longest conversation as `max_length_q/k`. Registered through transformers'
`AttentionInterface` with no mask function, the model builds no attention mask at all and those keyword
arguments reach `varlen_attention` unchanged; it calls `torch.nn.attention.varlen.varlen_attn` (flash-attention-2
kernels inside torch, causal, backward registered), so attention never crosses a conversation and nothing has to
be compiled for it.

torch's op has no CPU kernel (it calls aten's CUDA-only `_flash_attention_forward`). On a CPU the same op gets a
reference kernel here, one conversation at a time, with its backward: CPU runs (the tests) go through the same
custom op, the same autograd registration and the same shapes under `torch.compile` as a GPU run; only the kernel
differs.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

NAME = "varlen"


def torch_has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def register_varlen() -> None:
    """Make `attn_implementation="varlen"` loadable (idempotent); on a CPU, give torch's op its reference kernel."""
    import torch
    from transformers import AttentionInterface

    from workbench.workspace import StageError

    if not torch_has_varlen():
        raise StageError(f"train.attention: varlen needs torch.nn.attention.varlen (torch >= 2.10); this is torch "
                         f"{torch.__version__}")
    AttentionInterface.register(NAME, varlen_attention)
    _register_cpu_kernels()


@lru_cache(maxsize=1)
def _native_gqa() -> bool:
    """torch 2.12 added enable_gqa to varlen_attn; before it K/V heads are repeated to the query heads."""
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> ([1, T, Hq, D], None)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"attention 'varlen' computes plain causal attention; this model passes {unsupported}="
                             f"{kwargs[unsupported]!r}: use attention: sdpa or flex_attention")
    if dropout:
        raise ValueError(f"attention 'varlen' has no attention dropout (the model asks for {dropout})")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        if query.shape[0] != 1:
            raise ValueError(
                f"attention 'varlen' takes packed rows (batch 1 with cu_seq_lens_q); got a batch of {query.shape[0]} "
                "rows without conversation boundaries, whose padding mask never reaches this attention"
            )
        length = query.shape[2]
        cu_q = cu_k = torch.tensor([0, length], dtype=torch.int32, device=query.device)
        max_q = max_k = length
    else:
        cu_k = cu_q if cu_k is None else cu_k
        max_q = kwargs.get("max_length_q") or int(cu_q.diff().max())  # trl passes it: no device-to-host copy
        max_k = kwargs.get("max_length_k") or max_q
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if _native_gqa():
            gqa = {"enable_gqa": True}
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, scale=scaling,
                      window_size=(-1, 0), **gqa)
    return out[None], None


def packed_row(input_ids, attention_mask) -> dict:
    """A right-padded batch as one packed row with the keys trl's padding-free collator gives (for scoring text)."""
    import torch

    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    lengths = lengths[lengths > 0]
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    positions = torch.cat([torch.arange(int(n), device=input_ids.device) for n in lengths])
    return {"input_ids": input_ids[keep][None], "position_ids": positions[None], "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu, "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max())}


# --- the CPU reference kernel of torch's op ------------------------------------------------------------------


def _register_cpu_kernels() -> None:
    from torch.nn.attention import varlen as torch_varlen

    if getattr(_register_cpu_kernels, "done", False) or _cpu_kernel_exists():
        return
    torch_varlen._varlen_attn.register_kernel("cpu")(_cpu_forward)
    torch_varlen._varlen_attn_backward.register_kernel("cpu")(_cpu_backward)
    _register_cpu_kernels.done = True


def _cpu_kernel_exists() -> bool:
    """Whether torch's varlen op runs on a CPU tensor as shipped (it does not in torch 2.10 to 2.13)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    x = torch.zeros(2, 1, 8)
    try:
        varlen_attn(x, x, x, torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32), 2, 2)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _spans(cu):
    bounds = cu.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]  # padded cu_seq_lens repeat the last offset


def _probabilities(q, k, scale: float, causal: bool):
    """Softmax attention probabilities and log-sum-exp of one conversation: q [H, L, D], k [H, L, D]."""
    import torch

    scores = (q @ k.transpose(1, 2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if causal:
        length = q.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]), lse


def _check_window(is_causal: bool, window_size) -> None:
    window = list(window_size) if window_size is not None else [-1, -1]
    if window not in ([-1, -1], [-1, 0]):
        raise NotImplementedError(f"the CPU varlen kernel computes full or causal attention, not window {window}")


def _cpu_forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
                 enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """query [T, Hq, D], key/value [T, Hkv, D] -> (out [T, Hq, D], lse [Hq, T] float32, rng_state)."""
    import torch

    _check_window(is_causal, window_size)
    if not torch.equal(cu_seq_q, cu_seq_k):
        raise NotImplementedError("the CPU varlen kernel needs the same boundaries for queries and keys")
    total, heads, dim = query.shape
    rep = heads // key.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros_like(query)
    lse = torch.zeros(heads, total, dtype=torch.float32)
    for s, e in _spans(cu_seq_q):
        q = query[s:e].transpose(0, 1)
        k = key[s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
        v = value[s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
        p, lse_doc = _probabilities(q, k, scale, is_causal)
        lse[:, s:e] = lse_doc
        out[s:e] = (p.to(v.dtype) @ v).transpose(0, 1)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def _cpu_backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, rng_state,
                  scale=None, window_size=None):
    """Gradients of softmax attention per conversation (kernels run below autograd, so the math is written out)."""
    import torch

    _check_window(is_causal, window_size)
    total, heads, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for s, e in _spans(cu_seq_q):
        length = e - s
        q = query[s:e].transpose(0, 1)
        k = key[s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
        v = value[s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
        do, o = grad_out[s:e].transpose(0, 1), out[s:e].transpose(0, 1)
        p = _probabilities(q, k, scale, is_causal)[0].to(q.dtype)
        dv_full = p.transpose(1, 2) @ do
        dp = do @ v.transpose(1, 2)
        ds = p * (dp - (do * o).sum(dim=-1, keepdim=True))
        dq[s:e] = (ds @ k * scale).transpose(0, 1)
        dk_full = ds.transpose(1, 2) @ q * scale
        # a K/V head serves `rep` query heads: its gradient is their sum
        dk[s:e] = dk_full.reshape(kv_heads, rep, length, dim).sum(1).transpose(0, 1)
        dv[s:e] = dv_full.reshape(kv_heads, rep, length, dim).sum(1).transpose(0, 1)
    return dq, dk, dv
