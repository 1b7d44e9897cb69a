"""Everything the gate asks of one GGUF file, through llama-cpp-python, in a child process
(`workbench.llama_child`: a llama.cpp abort on a corrupt or truncated file kills only the child, and the gate
gets an error naming the file). Chats go through llama.cpp's own chat handling, which renders the template
embedded in the GGUF: what a llama.cpp or Ollama server would serve.
"""
from __future__ import annotations

import time

from workbench.llama_child import serve


def _chat(llm, messages: list[dict], max_new_tokens: int) -> tuple[str, float, float, int]:
    """(answer, time to first token in ms, decode tokens/s, completion tokens) for one greedy chat."""
    t0 = time.perf_counter()
    first = None
    pieces = []
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0,
                                            top_k=1, seed=0, stream=True):
        delta = chunk["choices"][0].get("delta", {})
        if "content" in delta and delta["content"] is not None:
            if first is None:
                first = time.perf_counter()
            pieces.append(delta["content"])
    end = time.perf_counter()
    answer = "".join(pieces).strip()
    n = len(llm.tokenize(answer.encode("utf-8"), add_bos=False, special=False)) if answer else 0
    first = first if first is not None else end
    decode_s = end - first
    tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    return answer, (first - t0) * 1000.0, tps, n


def _logprobs(model_path: str, records: list[list[int]], threads: int, lora_path: str | None = None):
    """Float16 log-softmax of every position of every record, concatenated [N, vocab]."""
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(r) for r in records)
    llm = Llama(model_path=model_path, n_ctx=longest + 8, n_batch=longest + 8, n_ubatch=longest + 8,
                logits_all=True, n_threads=threads, verbose=False, lora_path=lora_path)
    out = []
    for ids in records:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        m = logits.max(axis=-1, keepdims=True)
        lp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
        out.append(lp.astype(np.float16))
    del llm
    return np.concatenate(out)


def op_evaluate(job: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    threads = int(job["threads"])
    n_ctx = int(job["n_ctx"])
    lora = job.get("lora_path")  # a GGUF LoRA adapter applied at load time (llama-server --lora)
    llm = Llama(model_path=job["model_path"], n_ctx=n_ctx, n_threads=threads, seed=0, verbose=False, lora_path=lora)
    trained = int(llm.metadata.get(f"{llm.metadata.get('general.architecture', 'llama')}.context_length", n_ctx))
    if trained < n_ctx:  # a context longer than the model was trained for only adds warnings
        del llm
        llm = Llama(model_path=job["model_path"], n_ctx=trained, n_threads=threads, seed=0, verbose=False,
                    lora_path=lora)
    metadata = {k: v for k, v in llm.metadata.items() if k.startswith(("general.", "tokenizer.chat_template"))}
    answers: dict[str, list[str]] = {}
    ttft, tps, ntok = [], [], []
    for set_name, spec in job["chats"].items():
        answers[set_name] = []
        for messages in spec["conversations"]:
            a, t, s, n = _chat(llm, messages, int(spec["max_new_tokens"]))
            answers[set_name].append(a)
            if spec.get("timed"):
                ttft.append(t)
                tps.append(s)
                ntok.append(n)
    del llm
    has_lp = bool(job.get("records"))
    if has_lp:
        np.save(job["logprobs_out"], _logprobs(job["model_path"], job["records"], threads, lora))
    return {
        "answers": answers, "ttft_ms": ttft, "tokens_per_s": tps, "completion_tokens": ntok,
        "chat_template": metadata.get("tokenizer.chat_template"), "has_logprobs": has_lp,
        "metadata": {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"},
    }


if __name__ == "__main__":
    serve({"evaluate": op_evaluate})
