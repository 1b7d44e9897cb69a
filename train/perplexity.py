"""Token-level perplexity of plain text (the clean stage's held-out domain records)."""
from __future__ import annotations

import math


def text_perplexity(model, tokenizer, texts: list[str], max_len: int, batch_size: int = 4) -> float:
    """exp(mean negative log-likelihood over every predicted token of every text), each cut to max_len tokens."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    # varlen attention never sees a padding mask: it scores the batch as one packed row instead
    packed = getattr(model.config, "_attn_implementation", None) == "varlen"
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_len,
                                padding=True, return_tensors="pt", add_special_tokens=False)
                ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
                if packed:
                    logits, target = _packed_logits_and_targets(model, ids, mask)
                else:
                    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                      ignore_index=-100, reduction="sum")
                total_nll += float(nll)
                total_tokens += int((target != -100).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return float("nan")
    return math.exp(total_nll / total_tokens)


def _packed_logits_and_targets(model, ids, mask):
    """The batch as one packed row; each text's last token predicts nothing (the next text is not its future)."""
    from .attention import packed_row

    row = packed_row(ids, mask)
    logits = model(**row, use_cache=False).logits[:, :-1].float()
    target = row["input_ids"][:, 1:].clone()
    target[row["position_ids"][:, 1:] == 0] = -100
    return logits, target
