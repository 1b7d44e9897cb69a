"""Write an F16 GGUF of a merged Llama-family model with the `gguf` package, and read back what is in one.

What llama.cpp needs beyond the tensors: the hyperparameters under `<arch>.*`, the tokenizer (vocab, token
types, merges, the pre-tokenizer name llama.cpp uses to split text), the special token ids (bos/eos/pad and
eot: the token that ends an assistant turn), and `tokenizer.chat_template`.
"""
from __future__ import annotations

import json
from pathlib import Path

from recipes.sections.quantize import SUPPORTED_ARCHITECTURES
from workbench.chat import end_of_turn_token
from workbench.workspace import StageError

# token_type values of the GGUF spec
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6



def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way this byte-level BPE tokenizer splits text before BPE.

    llama.cpp hard-codes one split regex per name; a wrong name tokenizes differently without any error,
    so we only name the splits we recognise exactly (and the stage re-checks token ids through llama.cpp).
    """
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise StageError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"|\p{N}|" in regex:
            return "qwen2"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise StageError(
        f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp is known to "
        "reproduce here (SmolLM2, Llama 3, Qwen2 and GPT-2 splits are); refusing to write a GGUF that would tokenize differently"
    )


def _permute_qk(w, n_head: int):
    """HF stores q/k rows in rotate-half order; llama.cpp's 'llama' RoPE wants interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f16_gguf(model_dir: Path, out_path: Path, chat_template: str, name: str) -> None:
    """model_dir: a merged save_pretrained directory with its tokenizer. Writes out_path (F16, norms in F32)."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise StageError(f"{model_dir}: architecture {hf_arch!r} has no GGUF writer (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    arch_name = SUPPORTED_ARCHITECTURES[hf_arch]
    arch = gguf.MODEL_ARCH.LLAMA if arch_name == "llama" else gguf.MODEL_ARCH.QWEN2
    n_layer, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head

    w = gguf.GGUFWriter(str(out_path), arch_name)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(config["vocab_size"])

    _add_tokenizer(w, model_dir, config, chat_template, AutoTokenizer.from_pretrained(model_dir))

    names = gguf.get_tensor_name_map(arch, n_layer)
    weight_files = sorted(model_dir.glob("*.safetensors"))
    seen = set()
    for wf in weight_files:
        with safe_open(wf, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key).float().numpy()
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # tied: llama.cpp reuses token_embd
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise StageError(f"{wf}: tensor {key!r} has no GGUF name for architecture {arch_name}")
                if arch_name == "llama" and key.endswith("q_proj.weight"):
                    tensor = _permute_qk(tensor, n_head)
                elif arch_name == "llama" and key.endswith("k_proj.weight"):
                    tensor = _permute_qk(tensor, n_kv)
                # 1-D tensors (norms, biases) stay F32: llama.cpp requires it and they are tiny
                tensor = tensor.astype(np.float16 if tensor.ndim > 1 else np.float32)
                w.add_tensor(new, tensor)
                seen.add(new)
    if "token_embd.weight" not in seen:
        raise StageError(f"{model_dir}: no token embedding tensor found")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w, model_dir: Path, config: dict, chat_template: str, tok) -> None:
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    pre = pre_tokenizer_name(tj)
    vocab = tok.get_vocab()
    n_vocab = config["vocab_size"]
    if len(vocab) > n_vocab:
        raise StageError(f"{model_dir}: tokenizer has {len(vocab)} tokens but the model only {n_vocab} embeddings")
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(CONTROL if added[t].special else USER_DEFINED)
        else:
            tokens.append(t)
            types.append(NORMAL)
    merges = tj["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, setter in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("pad_token_id", w.add_pad_token_id), ("unk_token_id", w.add_unk_token_id)):
        value = getattr(tok, key, None)
        if value is not None:
            setter(value)
    eot = end_of_turn_token(vocab)  # llama.cpp stops generation on the eot token
    if eot is not None:
        w.add_eot_token_id(vocab[eot])
    # what the HF tokenizer does on plain encode: llama.cpp must do the same
    probe = tok("a").input_ids
    w.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))
    w.add_add_eos_token(bool(tok.eos_token_id is not None and probe and probe[-1] == tok.eos_token_id and len(probe) > 1))
    w.add_chat_template(chat_template)


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
    for key in ("general.architecture", "tokenizer.chat_template", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.eot_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"):
        f = reader.fields.get(key)
        if f is not None:
            fields[key] = f.contents()
    return {"bits_per_weight": round(8 * n_bytes / n_elems, 4), "tensor_bytes": n_bytes, "n_weights": n_elems,
            "tensor_types": types, "fields": fields}
