"""How each served artifact is run: transformers (adapter on base, merged, AWQ) in this process, llama.cpp
(every GGUF) in a child process so that a native abort becomes an error naming the file.

Every engine answers the same three questions: chat answers for a list of conversations (greedy),
next-token log-probabilities over a list of token-id records (full vocabulary, for drift), and negative
log-likelihood of those records (for perplexity). Token ids always come from the adapter's tokenizer,
so all engines are scored on identical tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workbench.chat import stop_token_ids
from workbench.workspace import StageError


def load_tokenizer(adapter_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    if not tok.chat_template:
        raise StageError(f"{adapter_dir}: the adapter's tokenizer has no chat template (train/adapter/chat_template.jinja)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class HFEngine:
    """A transformers causal LM: batched greedy generation, full-vocabulary log-probs."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, path: Path, tokenizer, dtype: str = "float32") -> "HFEngine":
        import torch
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        except Exception as exc:  # a broken artifact is a finding about the candidate, reported with its path
            raise StageError(f"{path}: cannot load with transformers: {type(exc).__name__}: {exc}") from exc
        return cls(model, tokenizer)

    def with_adapter(self, adapter_dir: Path) -> "HFEngine":
        """Wrap this (base) model with the PEFT adapter, unmerged: how the adapter is served on a base."""
        from peft import PeftModel

        return HFEngine(PeftModel.from_pretrained(self.model, adapter_dir), self.tokenizer)

    def chat(self, conversations: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
        import torch

        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        # similar lengths together: less padding per batch
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        stops = stop_token_ids(tok)
        tok.padding_side = "left"
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                    pad_token_id=tok.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for i, row in zip(idx, new):
                answers[i] = tok.decode(row, skip_special_tokens=True).strip()
        return answers

    def score(self, records: list[list[int]], keep_logprobs_tokens: int = 0):
        """(sum of next-token NLL, number of predicted tokens, float16 log-probs of the first
        `keep_logprobs_tokens` positions [N, vocab] or None)."""
        import numpy as np
        import torch

        nll, count, kept, kept_n = 0.0, 0, [], 0
        for ids in records:
            x = torch.tensor([ids])
            with torch.inference_mode():
                logits = self.model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            nll -= lp[:-1].gather(1, x[0, 1:, None]).sum().item()
            count += len(ids) - 1
            if kept_n < keep_logprobs_tokens:
                take = lp[: keep_logprobs_tokens - kept_n]
                kept.append(take.to(torch.float16).numpy())
                kept_n += take.shape[0]
        return nll, count, (np.concatenate(kept) if kept else None)


@dataclass
class GGUFResult:
    answers: dict[str, list[str]]
    ttft_ms: list[float]
    tokens_per_s: list[float]
    completion_tokens: list[int]
    chat_template: str | None
    logprobs_path: Path | None
    metadata: dict[str, str] = field(default_factory=dict)


def run_gguf(gguf_path: Path, label: str, job: dict, work_dir: Path, timeout_s: float) -> GGUFResult:
    """Everything the gate asks of one GGUF file (eval_gate.gguf_worker), in a child process: its crash is a
    StageError naming the file."""
    from workbench.llama_child import run_child

    work_dir.mkdir(parents=True, exist_ok=True)
    request = {**job, "op": "evaluate", "model_path": str(gguf_path), "logprobs_out": str(work_dir / "logprobs.npy")}
    res = run_child("eval_gate.gguf_worker", request, label=f"{label} ({gguf_path})", timeout=timeout_s,
                    timeout_hint=" (eval_gate.gguf_timeout_s)")
    return GGUFResult(
        answers=res["answers"], ttft_ms=res["ttft_ms"], tokens_per_s=res["tokens_per_s"],
        completion_tokens=res["completion_tokens"], chat_template=res.get("chat_template"),
        logprobs_path=Path(request["logprobs_out"]) if res.get("has_logprobs") else None,
        metadata=res.get("metadata", {}),
    )
