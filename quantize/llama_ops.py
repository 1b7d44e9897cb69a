"""The quantize stage's llama.cpp operations, each run in a child process through `workbench.llama_child`
(llama.cpp can abort the process on a bad file): quantize a GGUF, tokenize a chat through the GGUF's own
template, greedy generation, perplexity and logits, GGUF metadata edits.

    run_llama("quantize", "model-F16.gguf", output="model-Q8_0.gguf", type="Q8_0")
"""
from __future__ import annotations

from pathlib import Path

from workbench.llama_child import run_child, serve

LLAMA_FTYPES = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
}


def run_llama(op: str, path: Path | str, timeout: float = 3600, **kwargs) -> dict:
    """Run one llama.cpp operation on a GGUF file in a child process; a crash becomes a StageError naming the file."""
    return run_child("quantize.llama_ops", {"op": op, "path": str(path), **kwargs}, label=str(path), timeout=timeout)


# ---- child side -----------------------------------------------------------------------------------------

def _load(path: str, vocab_only: bool = False, n_ctx: int = 512, lora: str | None = None):
    """A llama.cpp model for checks: one thread and fixed seed, so the numbers repeat run to run; `lora`: a
    GGUF LoRA adapter applied on top (what `llama-server --lora` does)."""
    from llama_cpp import Llama

    return Llama(model_path=path, vocab_only=vocab_only, n_ctx=n_ctx, n_threads=1, n_batch=n_ctx,
                 logits_all=not vocab_only, verbose=False, seed=0, lora_path=lora)


def op_quantize(req: dict) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[req["type"]])
    params.nthread = int(req.get("threads", 1))
    rc = llama_cpp.llama_model_quantize(req["path"].encode(), req["output"].encode(), ctypes.byref(params))
    if rc != 0:
        return {"error": f"llama_model_quantize returned {rc} for type {req['type']}"}
    return {}


def op_chat_tokens(req: dict) -> dict:
    """Render messages with the GGUF's own embedded template (the Jinja renderer llama-cpp-python uses for
    chat completion) and tokenize with the GGUF's tokenizer; also tokenize the given raw texts."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = _load(req["path"], vocab_only=True)
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
    out: dict = {"template": template, "add_bos": add_bos}

    def tok_text(token_id: str | None) -> str:
        return llm.detokenize([int(token_id)], special=True).decode("utf-8", "replace") if token_id is not None else ""

    if req.get("messages") is not None:
        if not template:
            return {"error": "no tokenizer.chat_template in the file"}
        fmt = Jinja2ChatFormatter(template, eos_token=tok_text(meta.get("tokenizer.ggml.eos_token_id")),
                                  bos_token=tok_text(meta.get("tokenizer.ggml.bos_token_id")))
        prompt = fmt(messages=req["messages"]).prompt
        bos = tok_text(meta.get("tokenizer.ggml.bos_token_id"))
        if add_bos and bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]  # llama.cpp's chat templating drops a BOS the tokenizer adds anyway
        out["prompt"] = prompt
        out["template_ids"] = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    out["texts_ids"] = [llm.tokenize(t.encode("utf-8"), add_bos=add_bos, special=True) for t in req.get("texts", [])]
    return out


def op_generate(req: dict) -> dict:
    """Greedy continuation of prompt token ids (argmax at each step, no sampling)."""
    import numpy as np

    ids = req["prompt_ids"]
    n = int(req["max_new_tokens"])
    llm = _load(req["path"], n_ctx=max(64, len(ids) + n + 8))
    llm.eval(ids)
    out = []
    eog = set(req.get("stop_ids", []))
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt in eog:
            break
        llm.eval([nxt])
    return {"ids": out, "text": llm.detokenize(out).decode("utf-8", "replace")}


def op_logits(req: dict) -> dict:
    """Next-token logits after every prefix of the token ids, saved as a float32 .npy at req["out"] (a file:
    a vocabulary's worth of floats per position is too much for a JSON line)."""
    import numpy as np

    ids = req["ids"]
    llm = _load(req["path"], n_ctx=max(64, len(ids) + 8), lora=req.get("lora"))
    llm.eval(ids)
    np.save(req["out"], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    return {"positions": len(ids)}


def op_set_metadata(req: dict) -> dict:
    """Copy the GGUF at path to req["output"] with string (set_str) and uint32 (set_u32) metadata set, through
    ggml's own gguf code: the header is rewritten and the tensor data copied byte for byte (tensor offsets
    count from the start of the data section, so they still hold). Replies which `report` keys the copy has.
    (gguf's Python reader parses every vocabulary entry one by one: seconds for a 150k-token vocabulary.)"""
    import ctypes
    import shutil

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    lib.gguf_get_data_offset.restype = ctypes.c_size_t
    lib.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
    lib.gguf_set_val_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.gguf_set_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_write_to_file.restype = ctypes.c_bool
    lib.gguf_write_to_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]
    lib.gguf_free.argtypes = [ctypes.c_void_p]

    ctx = lib.gguf_init_from_file(req["path"].encode(), InitParams(True, None))
    if not ctx:
        return {"error": "gguf_init_from_file failed (not a GGUF file?)"}
    try:
        data_offset = lib.gguf_get_data_offset(ctx)
        for key, value in req.get("set_str", {}).items():
            lib.gguf_set_val_str(ctx, key.encode(), value.encode("utf-8"))
        for key, value in req.get("set_u32", {}).items():
            lib.gguf_set_val_u32(ctx, key.encode(), int(value))
        present = {key: lib.gguf_find_key(ctx, key.encode()) >= 0 for key in req.get("report", [])}
        if not lib.gguf_write_to_file(ctx, req["output"].encode(), True):  # header, metadata, tensor infos, padding
            return {"error": f"gguf_write_to_file failed for {req['output']}"}
    finally:
        lib.gguf_free(ctx)
    with open(req["path"], "rb") as src, open(req["output"], "ab") as dst:
        src.seek(data_offset)
        shutil.copyfileobj(src, dst, 16 << 20)
    return {"present": present}


def op_perplexity(req: dict) -> dict:
    """Sum of next-token NLL over windows of token ids (already tokenized by the caller, so every format
    is scored on identical tokens)."""
    import numpy as np

    windows = req["windows"]
    llm = _load(req["path"], n_ctx=max(len(w) for w in windows) + 8)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return {"nll": nll, "tokens": count}


OPS = {"quantize": op_quantize, "chat_tokens": op_chat_tokens, "generate": op_generate, "perplexity": op_perplexity,
       "logits": op_logits, "set_metadata": op_set_metadata}


if __name__ == "__main__":
    serve(OPS)
