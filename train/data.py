"""The clean stage's splits as the train stage reads them, with every bad record named by split and index."""
from __future__ import annotations

from pathlib import Path

from workbench.workspace import StageError

ROLES = {"system", "user", "assistant"}


def load_split(clean_dir: Path, split: str, column: str, required: bool = True):
    """clean/<split> as one in-memory Dataset with only `column`; None when an optional split is absent."""
    from datasets import Dataset, load_from_disk

    path = clean_dir / split
    if not path.exists():
        if required:
            raise StageError(f"{path}: the clean stage output has no '{split}' dataset")
        return None
    try:
        ds = load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # a corrupt or foreign directory: say which
        raise StageError(f"{path}: not a datasets Arrow directory ({exc})") from None
    if not isinstance(ds, Dataset):
        raise StageError(f"{path}: expected one Dataset, found {type(ds).__name__}")
    if column not in ds.column_names:
        raise StageError(f"{path}: no '{column}' column (columns: {', '.join(ds.column_names)})")
    if required and len(ds) == 0:
        raise StageError(f"{path}: the '{split}' split is empty")
    ds = ds.select_columns([column])
    if column == "messages":
        check_messages(ds, path)
    return ds


def check_messages(ds, path: Path) -> None:
    for i, record in enumerate(ds["messages"]):
        if not record:
            raise StageError(f"{path}: record {i}: 'messages' is empty")
        for j, msg in enumerate(record):
            if msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                raise StageError(f"{path}: record {i}, message {j}: needs role in {sorted(ROLES)} and string content, "
                                 f"got {msg!r:.120}")
        if not any(m["role"] == "assistant" for m in record):
            raise StageError(f"{path}: record {i}: no assistant turn to learn from")
