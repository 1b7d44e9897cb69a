"""F16 GGUF by llama.cpp's own converter, with the metadata the stage guarantees set on top; and what is in a
GGUF file (real bits per weight, tensor types, the metadata the stage checks).

The converter writes the tensors, the hyperparameters, the tokenizer (vocab, token types, merges or
sentencepiece scores, the pre-tokenizer name) and the special ids it finds. The stage then sets, with ggml's own
gguf code (in a llama.cpp child): `general.name` (the recipe), `tokenizer.chat_template` (the adapter's template without
transformers' generation markers, which llama.cpp's Jinja rejects), and `tokenizer.ggml.eot_token_id` (the
token that ends an assistant turn: llama.cpp stops generating on it). It then checks that bos/eos/eot are there.
"""
from __future__ import annotations

from pathlib import Path

from workbench.chat import END_OF_TURN_TOKENS
from workbench.workspace import StageError

TOKENIZER = "tokenizer.ggml."


def write_f16_gguf(model_dir: Path, out_path: Path, chat_template: str, name: str, eot_token: str | None = None) -> None:
    """model_dir: a save_pretrained directory with its tokenizer. Writes out_path (F16, norms in F32)."""
    from .gguf_convert import convert_hf_to_gguf

    raw = out_path.with_name(out_path.name + ".converted")
    try:
        convert_hf_to_gguf(model_dir, raw, outtype="f16")
        set_stage_metadata(raw, out_path, model_dir, chat_template, name, eot_token)
    finally:
        raw.unlink(missing_ok=True)


def write_vocab_gguf(model_dir: Path, out_path: Path, chat_template: str, name: str, eot_token: str | None = None) -> None:
    """The same metadata and tokenizer without any tensor (seconds): for checks before the weights exist."""
    from .gguf_convert import vocab_only_gguf

    raw = out_path.with_name(out_path.name + ".converted")
    try:
        vocab_only_gguf(model_dir, raw)
        set_stage_metadata(raw, out_path, model_dir, chat_template, name, eot_token)
    finally:
        raw.unlink(missing_ok=True)


def set_stage_metadata(src: Path, dst: Path, model_dir: Path, chat_template: str, name: str,
                       eot_token: str | None) -> None:
    """Copy src to dst with general.name, the chat template and the eot id set (by ggml's gguf code, in a
    llama.cpp child); check that bos/eos/eot are there."""
    import json

    from .llama_ops import run_llama

    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    u32 = {}
    eot_id = _eot_id(model_dir, eot_token)
    if eot_id is not None:
        u32[TOKENIZER + "eot_token_id"] = eot_id
    wanted = [TOKENIZER + k for k in ("eos_token_id", "eot_token_id")] + (
        [TOKENIZER + "bos_token_id"] if tok_cfg.get("bos_token") else [])
    reply = run_llama("set_metadata", src, output=str(dst), report=wanted, set_u32=u32, timeout=3600,
                      set_str={"general.name": llama_cpp_name(name, model_type), "tokenizer.chat_template": chat_template})
    missing = [k for k, there in reply["present"].items() if not there]
    if missing:
        dst.unlink(missing_ok=True)
        raise StageError(f"{src}: llama.cpp's converter wrote no {', '.join(missing)} for {model_dir} "
                         "(the turn-ending token must be one of the vocabulary's special tokens)")


def llama_cpp_name(name: str, model_type: str) -> str:
    """general.name: the recipe's name. llama.cpp gives Phi-3's special tokens their strip-the-whitespace-after
    attribute (as Phi-3's own tokenizer has) only when general.name says phi-3, so a Phi-3 model's name says so."""
    if model_type.startswith("phi3") and not any(k in name.lower() for k in ("phi-3", "phi3")):
        return f"{name} (phi-3)"
    return name


def _eot_id(model_dir: Path, eot_token: str | None) -> int | None:
    """The id of the turn-ending token (the converter keeps the HF tokenizer's ids)."""
    import json

    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict):
        ids = {**vocab, **ids}
    else:  # unigram: [piece, score] pairs
        ids = {**{p[0]: i for i, p in enumerate(vocab)}, **ids}
    if eot_token is not None:
        if eot_token not in ids:
            raise StageError(f"{model_dir}: the turn-ending token {eot_token!r} is not in the tokenizer's vocabulary")
        return ids[eot_token]
    return next((ids[t] for t in END_OF_TURN_TOKENS if t in ids), None)


def gguf_summary(path: Path) -> dict:
    """Real bits per weight (all tensor bytes over all elements), tensor type counts, and the metadata we check."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elems = sum(int(t.n_elements) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    fields = {}
    for key in ("general.architecture", "general.name", "tokenizer.chat_template", "tokenizer.ggml.model",
                "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id", "adapter.type", "adapter.lora.alpha"):
        f = reader.fields.get(key)
        if f is not None:
            fields[key] = f.contents()
    return {"bits_per_weight": round(8 * n_bytes / n_elems, 4) if n_elems else None, "tensor_bytes": n_bytes,
            "n_weights": n_elems, "tensor_types": types, "fields": fields}
