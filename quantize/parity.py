"""Template and stop-token parity: the same conversation must become the same token ids through the HF
tokenizer's chat template, the GGUF's embedded template and tokenizer (llama.cpp), and the Ollama Modelfile
TEMPLATE; and the same greedy answer must come out of the merged model and a GGUF."""
from __future__ import annotations

from pathlib import Path

from .ollama_template import render_modelfile_prompt
from .llama_ops import run_llama


def hf_chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the chat template already wrote any BOS it wants; encode must not add specials again
    return tokenizer(text, add_special_tokens=False).input_ids


def template_parity(tokenizer, gguf_path: Path, modelfile: str, messages: list[dict]) -> dict:
    """Token ids of `messages` through the three routes, and the list of routes that disagree with HF."""
    hf = hf_chat_ids(tokenizer, messages)
    go_prompt = render_modelfile_prompt(modelfile, messages)
    reply = run_llama("chat_tokens", gguf_path, messages=messages, texts=[go_prompt], timeout=600)
    routes = {"hf": hf, "gguf_template": reply["template_ids"], "modelfile_template": reply["texts_ids"][0]}
    mismatches = []
    for name in ("gguf_template", "modelfile_template"):
        ids = routes[name]
        if ids != hf:
            at = next((i for i, (a, b) in enumerate(zip(hf, ids)) if a != b), min(len(hf), len(ids)))
            mismatches.append(
                f"{name}: token {at} differs (HF {tokenizer.decode(hf[at:at + 8])!r} vs "
                f"{tokenizer.decode(ids[at:at + 8])!r}; {len(hf)} vs {len(ids)} tokens)")
    return {"ids": routes, "mismatches": mismatches, "gguf_prompt": reply.get("prompt"), "modelfile_prompt": go_prompt}


def greedy_hf(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def greedy_gguf(gguf_path: Path, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int] = ()) -> list[int]:
    return run_llama("generate", gguf_path, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                     stop_ids=list(stop_ids), timeout=600)["ids"]
