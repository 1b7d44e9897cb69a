"""A fixed token budget per micro-step: every packed batch gets the same shapes, so compiled layers compile once.

trl's padding-free collator flattens a batch of packed rows into one row whose length changes every step. This
wrapper (composition: it holds trl's collator, or anything that returns the same keys) pads that row to
`rows x max_seq_len` tokens. The padding is one more conversation, fully masked: pad token ids, labels -100,
positions counting from 0, its own entry in `cu_seq_lens`. A padding longer than `max_seq_len` is split into
conversations of at most `max_seq_len`, so `max_length_q/k` can be the constant `max_seq_len` (the kernels size
their work by it). `cu_seq_lens` is padded to a fixed length by repeating its last offset: zero-length
conversations, which attend to nothing.

trl's own `pad_to_multiple_of` is not this: it pads `position_ids` with 0, which makes every pad token a
conversation of its own, so `cu_seq_lens` still changes length every step.
"""
from __future__ import annotations

import sys


class TokenBudget:
    """Pads every padding-free batch to `max(len(examples), rows) x max_seq_len` tokens.

    `max_conversations_per_row` bounds how many conversations a packed row holds (trl's `seq_lengths` column
    tells); `cu_seq_lens` then always has `rows x (max_conversations_per_row + 1) + 1` entries (one padding
    conversation per row at most, since a padding piece is at most one row long).
    """

    def __init__(self, collator, rows: int, max_seq_len: int, max_conversations_per_row: int, pad_token_id: int):
        if rows < 1 or max_seq_len < 1 or max_conversations_per_row < 1:
            raise ValueError(f"TokenBudget needs positive sizes, got rows={rows}, max_seq_len={max_seq_len}, "
                             f"max_conversations_per_row={max_conversations_per_row}")
        self.collator = collator
        self.rows, self.max_seq_len = rows, max_seq_len
        self.per_row = max_conversations_per_row
        self.pad_token_id = pad_token_id
        self.padded_tokens = 0  # how many pad tokens this wrapper added (never trained on, never counted as data)

    @property
    def tokens(self) -> int:
        """The training budget: tokens per micro-step."""
        return self.rows * self.max_seq_len

    def __call__(self, examples):
        batch = self.collator(examples)
        if "cu_seq_lens_q" not in batch:  # padded batches already have one shape per batch size
            return batch
        return self.pad(batch, max(len(examples), self.rows))

    def pad(self, batch: dict, rows: int) -> dict:
        import torch

        length, budget = batch["input_ids"].shape[1], rows * self.max_seq_len
        if length > budget:
            raise ValueError(f"a packed batch of {length} tokens is over the token budget of {budget}")
        pieces = _split(budget - length, self.max_seq_len)
        cu = batch["cu_seq_lens_q"]
        cu = torch.cat([cu, (torch.tensor(pieces, dtype=torch.long).cumsum(0) + int(cu[-1])).to(cu.dtype)])
        if cu.numel() > rows * (self.per_row + 1) + 1:
            self.per_row = -(-(cu.numel() - 1) // rows) - 1
            print(f"train: note: a batch holds {cu.numel() - 1} conversations, more than planned: cu_seq_lens grows "
                  f"to {rows * (self.per_row + 1) + 1} entries (compiled layers compile once more)", file=sys.stderr)
        cu = torch.cat([cu, cu[-1:].expand(rows * (self.per_row + 1) + 1 - cu.numel())])
        out = dict(batch)
        pad_len = budget - length
        self.padded_tokens += pad_len
        out["input_ids"] = _extend(batch["input_ids"], pad_len, self.pad_token_id)
        out["labels"] = _extend(batch["labels"], pad_len, -100)
        positions = torch.cat([torch.zeros(0, dtype=torch.long), *(torch.arange(n) for n in pieces)])
        out["position_ids"] = torch.cat([batch["position_ids"], positions[None].to(batch["position_ids"].dtype)], 1)
        if "seq_idx" in batch:  # trl's per-token conversation index (for linear-attention layers)
            first = int(batch["seq_idx"].max()) + 1 if batch["seq_idx"].numel() else 0
            idx = [torch.full((n,), first + i) for i, n in enumerate(pieces)]
            idx = torch.cat([torch.zeros(0, dtype=torch.long), *idx])
            out["seq_idx"] = torch.cat([batch["seq_idx"], idx[None].to(batch["seq_idx"].dtype)], 1)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        out["max_length_q"] = out["max_length_k"] = self.max_seq_len
        return out


def _split(n: int, piece: int) -> list[int]:
    return [piece] * (n // piece) + ([n % piece] if n % piece else [])


def _extend(row, n: int, value: int):
    import torch

    return torch.cat([row, torch.full((1, n), value, dtype=row.dtype)], dim=1)


def max_conversations_per_row(*datasets) -> int:
    """The most conversations any packed row of these datasets holds (trl's `seq_lengths` column)."""
    most = 1
    for ds in datasets:
        if ds is not None and "seq_lengths" in ds.column_names:
            most = max([most, *map(len, ds["seq_lengths"])])
    return most
