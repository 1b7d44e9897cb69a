"""`python -m quantize RECIPE [--force]`: the quantize stage (quantize/stage.py)."""
import sys

from workbench.stage_cli import stage_main


def main(argv: list[str] | None = None) -> int:
    return stage_main("quantize", "Merge the adapter; write GGUF (llama.cpp/Ollama) and AWQ (vLLM) targets.",
                      "quantize.stage:run", argv)


if __name__ == "__main__":
    sys.exit(main())
