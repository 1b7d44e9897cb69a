"""Raw JSONL in, one validated record (or one quarantine reason) per line out.

Accepted shapes: chat `{"messages": [{"role", "content"}...]}`, `{"prompt", "completion"}` (becomes a user
and an assistant turn), and plain `{"text"}` (held-out text). Metadata fields (`id`, `source`, `meta`,
`metadata`) are allowed; any other extra field is counted in the report, never silently lost.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

ROLES = ("system", "user", "assistant")
METADATA_FIELDS = frozenset({"id", "source", "meta", "metadata"})
CONTENT_FIELDS = ("messages", "prompt", "completion", "text")
READ_CHUNK = 1 << 16

# C0/C1 control characters except tab and newline, plus invisible format characters that only confuse
# tokenizers (BOM, zero-width space/joiners, soft hyphen).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200d\u2060\ufeff]")
_ODD_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


class Quarantined(Exception):
    """A record that cannot be used; `reason` is a short stable category, `detail` says exactly why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    line: int
    kind: str  # "chat" | "text"
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str | None = None  # the record's `source` metadata field, for cleaning.upsample

    def contents(self) -> list[str]:
        return [m["content"] for m in self.messages] if self.kind == "chat" else [self.text or ""]

    def joined(self) -> str:
        """One string for hashing and n-grams: roles kept, so a user turn never equals an assistant turn."""
        if self.kind == "chat":
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)
        return self.text or ""

    def to_json(self) -> dict:
        return {"messages": self.messages} if self.kind == "chat" else {"text": self.text}


@dataclass
class RawLine:
    number: int  # 1-based line number in the file
    data: bytes | None  # None when the line was longer than the limit (then `size` says how long)
    size: int
    head: bytes = b""  # the first bytes of an oversized line, for the quarantine excerpt


def read_lines(f: BinaryIO, max_bytes: int) -> Iterator[RawLine]:
    """Lines of a binary stream without ever holding more than `max_bytes` of one line in memory."""
    number = 0
    while True:
        chunk = f.readline(max_bytes + 1)
        if not chunk:
            return
        number += 1
        if len(chunk) <= max_bytes or chunk.endswith(b"\n"):
            yield RawLine(number, chunk.rstrip(b"\r\n"), len(chunk))
            continue
        # oversized: skip the rest of the line in fixed chunks, keeping only its length
        head, size = chunk[:512], len(chunk)
        while not chunk.endswith(b"\n"):
            chunk = f.readline(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
        yield RawLine(number, None, size, head)


def normalize_text(text: str) -> str:
    """NFC, control and invisible characters removed, odd spaces made plain, line ends tidied.

    Runs of spaces inside a line are kept: this domain is full of indented code.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
        text = _ODD_SPACES.sub(" ", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def parse_line(raw: RawLine, ignored_fields: dict[str, int] | None = None) -> Record:
    """The record on one raw line, validated (not yet normalized); raises Quarantined otherwise."""
    if raw.data is None:
        raise Quarantined("oversized", f"record of {raw.size} bytes is over cleaning.max_record_bytes")
    try:
        line = raw.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Quarantined("invalid_utf8", f"not UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise Quarantined("invalid_json", f"{exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise Quarantined("invalid_json", "nested too deeply") from None
    if not isinstance(obj, dict):
        raise Quarantined("not_an_object", f"a JSON {type(obj).__name__}, not an object")
    present = [k for k in CONTENT_FIELDS if k in obj]
    extra = [k for k in obj if k not in CONTENT_FIELDS and k not in METADATA_FIELDS]
    if ignored_fields is not None:
        for k in extra:
            ignored_fields[k] = ignored_fields.get(k, 0) + 1
    if present == ["messages"]:
        messages = _chat(obj["messages"])
    elif sorted(present) == ["completion", "prompt"]:
        messages = _chat([{"role": "user", "content": obj["prompt"]},
                          {"role": "assistant", "content": obj["completion"]}], shape="prompt/completion")
    elif present == ["text"]:
        text = obj["text"]
        if not isinstance(text, str):
            raise Quarantined("bad_type", f"'text' is a {type(text).__name__}, not a string")
        if not text.strip():
            raise Quarantined("empty_content", "'text' is empty")
        return Record(raw.number, "text", text=text)
    elif not present:
        raise Quarantined("unknown_shape", f"no 'messages', 'prompt'/'completion' or 'text' field (fields: {_names(obj)})")
    else:
        raise Quarantined("ambiguous_shape", f"fields {present} mix record shapes; use exactly one")
    source = obj.get("source")
    return Record(raw.number, "chat", messages=messages, source=source if isinstance(source, str) else None)


def _names(obj: dict) -> str:
    names = sorted(str(k)[:40] for k in obj)[:8]
    return ", ".join(names) or "none"


def _chat(messages, shape: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise Quarantined("bad_messages", f"'{shape}' must be a non-empty list of turns")
    out = []
    for i, m in enumerate(messages):
        where = f"turn {i}" if shape == "messages" else ("prompt" if i == 0 else "completion")
        if not isinstance(m, dict):
            raise Quarantined("bad_messages", f"{where} is a {type(m).__name__}, not an object")
        extra = set(m) - {"role", "content"}
        if extra:
            raise Quarantined("bad_messages", f"{where} has unexpected fields {sorted(str(k)[:40] for k in extra)[:5]}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            shown = role[:40] if isinstance(role, str) else type(role).__name__
            raise Quarantined("bad_role", f"{where} has role {shown!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise Quarantined("bad_type", f"{where} content is a {type(content).__name__}, not a string")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise Quarantined("bad_order", "a system turn may only come first")
    if not body:
        raise Quarantined("no_assistant", "only a system turn")
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise Quarantined("bad_order", f"turns must alternate user/assistant starting with user; got {' '.join(roles)}")
    if body[-1] != "assistant":
        raise Quarantined("no_assistant", "the last turn must be the assistant's answer")
    check_not_empty(out)
    return out


def check_not_empty(messages: list[dict[str, str]], after: str = "") -> None:
    for i, m in enumerate(messages):
        if not m["content"].strip() and m["role"] != "system":
            raise Quarantined("empty_content", f"{m['role']} turn {i} is empty{after}")


def normalize_record(rec: Record) -> bool:
    """Normalize a record in place; True when anything changed. Raises Quarantined if it became empty."""
    changed = False
    if rec.kind == "chat":
        for m in rec.messages:
            new = normalize_text(m["content"])
            changed |= new != m["content"]
            m["content"] = new
        check_not_empty(rec.messages, after=" after normalization")
    else:
        new = normalize_text(rec.text)
        changed = new != rec.text
        rec.text = new
        if not new:
            raise Quarantined("empty_content", "'text' is empty after normalization")
    return changed


def looks_binary(path: Path) -> str | None:
    """Why a file is plainly not JSONL (compressed or an archive), or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, what in ((b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"),
                        (b"\x28\xb5\x2f\xfd", "zstd"), (b"ARROW1", "Arrow"), (b"PAR1", "Parquet")):
        if head.startswith(magic):
            return f"a {what} file, not JSONL text; decompress or convert it first"
    return None
