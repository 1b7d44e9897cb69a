"""The quantize stage: merge the adapter, then GGUF (llama.cpp, Ollama) and AWQ W4A16 (vLLM) targets (docs/quantization.md)."""
