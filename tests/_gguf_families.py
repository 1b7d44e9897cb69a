"""Tiny random-init models of each family the GGUF path is tested on, each with its family's own chat template
(tests/chat_templates/) and a tokenizer that behaves like the family's own (special tokens, BOS on encode,
spaces around special tokens):
  bpe   SmolLM2's byte-level BPE with the family's markers added (Llama 3, Gemma 3, Qwen3);
  qwen2 Qwen2's real vocabulary (from llama.cpp's tokenizer test files, installed with the converters):
        transformers always splits a Qwen2 model's text with Qwen2's regex, which the converter recognises
        only by the ids it gives on that vocabulary;
  spm   a sentencepiece model trained here on a few kilobytes of text, where the family's converter reads
        tokenizer.model (Phi-3; Mistral as its v0.x instruct models ship).
"""
from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = Path(__file__).with_name("chat_templates")
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    name: str
    model: str  # transformers class name
    config: str
    template: str  # tests/chat_templates/<template>.jinja
    go_family: str  # the Ollama template family the stage must pick for it
    tokenizer: str  # "bpe", "qwen2" or "spm" (see above)
    specials: tuple[str, ...] = ()  # added to the tokenizer (bpe) or made control symbols (spm)
    bos: str | None = None
    eos: str | None = None
    add_bos: bool = False  # the tokenizer puts BOS in front of encoded text (as Llama 3, Mistral, Gemma do)
    legacy_spaces: bool = False  # spm: a space prefix after every special token (Llama 2 / Mistral v0.x)
    rstrip_specials: bool = False  # special tokens eat the whitespace after them (Phi-3's added tokens)
    config_extra: dict = field(default_factory=dict)


FAMILIES = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", "LlamaConfig", "llama3", "llama3", "bpe",
           ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           bos="<|begin_of_text|>", eos="<|eot_id|>", config_extra={"tie_word_embeddings": False}),
    # head_dim 32 != hidden/heads, as Mistral Nemo has
    Family("mistral", "MistralForCausalLM", "MistralConfig", "mistral", "mistral", "spm", ("[INST]", "[/INST]"),
           bos="<s>", eos="</s>", add_bos=True, legacy_spaces=True,
           config_extra={"head_dim": 32, "sliding_window": None, "tie_word_embeddings": False}),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "qwen2", "chatml", "qwen2", eos="<|im_end|>",
           config_extra={"tie_word_embeddings": False}),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", "qwen3", "chatml", "bpe", eos="<|im_end|>",
           config_extra={"head_dim": 32, "tie_word_embeddings": True}),
    # six layers: Gemma 3's five sliding-window layers and one global one (llama.cpp hard-codes that pattern);
    # a window shorter than the test prompts, so that the sliding window matters
    Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", "gemma3", "gemma", "bpe",
           ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>",
           config_extra={"num_hidden_layers": 6, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                         "layer_types": None}),
    Family("phi3", "Phi3ForCausalLM", "Phi3Config", "phi3", "phi3", "spm",
           ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), bos="<s>", eos="<|end|>", legacy_spaces=True,
           rstrip_specials=True,
           config_extra={"tie_word_embeddings": False, "pad_token_id": None}),
)}

# text the sentencepiece tokenizers are trained on (and the prompts are drawn from)
CORPUS = [
    "How do I read a file line by line? Open it with open(path) and iterate over the file object.",
    "And how do I count the words in a string? Split it: len(text.split()) counts them.",
    "The itertools module implements iterator building blocks such as chain, islice and groupby.",
    "functools.lru_cache memoizes a function's results, keyed by its arguments.",
    "The logging module lets libraries emit messages that applications configure with handlers.",
    "You are a concise assistant for the Python standard library. Use os.path.join(a, b) or pathlib.",
    "Call json.loads(text); json.load(f) reads from a file. sorted(rows, key=operator.itemgetter('name')).",
    "subprocess.run(['ls', '-l'], check=True, capture_output=True) runs a shell command; 0123456789.",
]


def spm_tokenizer(out: Path, fam: Family):
    """A Llama-style sentencepiece BPE tokenizer (byte fallback, <unk>/<s>/</s> = 0/1/2) with the family's
    specials as control symbols, as a transformers tokenizer; tokenizer.model is kept beside it (the
    converter reads it)."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=420, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, control_symbols=list(fam.specials), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, minloglevel=2, num_threads=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(out, legacy=fam.legacy_spaces, add_bos_token=fam.add_bos)
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False, rstrip=fam.rstrip_specials) for t in fam.specials]})
    return tok


def qwen2_tokenizer(cache: Path):
    """Qwen2's tokenizer rebuilt from llama.cpp's vocab-only GGUF of it (vocab, merges, the three control
    tokens), saved once under cache."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    import gguf
    from tokenizers import AddedToken

    from quantize.gguf_convert import require_tools

    r = gguf.GGUFReader(str(require_tools() / "models" / "ggml-vocab-qwen2.gguf"))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (1, 3)}  # normal and control
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]})
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    tmp.rename(cache)
    return tok


def family_tokenizer(fam: Family, smollm2_dir: Path, work: Path, cache: Path):
    from transformers import AutoTokenizer

    if fam.tokenizer == "spm":
        tok = spm_tokenizer(work, fam)
    elif fam.tokenizer == "qwen2":
        tok = qwen2_tokenizer(cache / "qwen2-tokenizer")
    else:
        tok = AutoTokenizer.from_pretrained(smollm2_dir)
        if fam.specials:
            tok.add_special_tokens({"additional_special_tokens": list(fam.specials)})
    if fam.bos:
        tok.bos_token = fam.bos
    if fam.eos:
        tok.eos_token = fam.eos
    if fam.tokenizer == "bpe" and fam.add_bos:
        tok.add_bos_token = True
    tok.chat_template = (TEMPLATES / f"{fam.template}.jinja").read_text(encoding="utf-8")
    probe = tok("a").input_ids
    assert (probe[0] == tok.bos_token_id) == fam.add_bos, f"{fam.name}: BOS on encode is {probe[0] == tok.bos_token_id}"
    return tok


def build_family_model(fam: Family, out: Path, smollm2_dir: Path, cache: Path, seed: int = 0, scale: float = 8.0) -> Path:
    """Save a tiny random `fam` model with its tokenizer and template to out; weights scaled up so that the
    next-token distributions are peaked (near-ties would make top-1 agreement a coin toss)."""
    import torch
    import transformers

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = family_tokenizer(fam, smollm2_dir, tmp, cache)
    cfg = getattr(transformers, fam.config)(**{
        **SMALL, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, **fam.config_extra})
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(scale)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prompt_ids(tok, n: int = 40) -> list[int]:
    """A fixed prompt of about n tokens (longer than Gemma's test sliding window)."""
    ids = tok(" ".join(CORPUS), add_special_tokens=False).input_ids[:n]
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def hf_logits(model_dir: Path, ids: list[int], adapter_dir: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def gguf_logits(gguf_path: Path, ids: list[int], out: Path, lora: Path | None = None):
    import numpy as np

    from quantize.llama_ops import run_llama

    run_llama("logits", gguf_path, ids=ids, out=str(out), lora=str(lora) if lora else None, timeout=300)
    return np.load(out).astype(np.float64)


def drift(ref, test, decided: float = 0.0) -> dict:
    """Mean KL(ref || test) of the next-token distributions over positions, and top-1 agreement over the
    positions where ref's best token leads its runner-up by at least `decided` nats (the others are near-ties)."""
    import numpy as np

    def logsoftmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp, lq = logsoftmax(ref), logsoftmax(test)
    kld = float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())
    top2 = np.sort(lp, axis=1)[:, -2:]
    sure = (top2[:, 1] - top2[:, 0]) >= decided
    agree = ref.argmax(axis=1) == test.argmax(axis=1)
    return {"kld": kld, "top1": float(agree[sure].mean()) if sure.any() else 0.0, "decided": int(sure.sum()),
            "positions": int(ref.shape[0])}

