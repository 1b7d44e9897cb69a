"""Upstream outputs for the quantize tests, built through the workspace API (not the clean/train packages):
a tiny cleaned dataset and a PEFT LoRA adapter saved the way docs/stages.md describes train/adapter/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ChatML with the generation markers transformers uses for assistant-only loss (what the train stage ships)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# the same, written with whitespace control and a default system turn when the conversation has none
CHATML_DEFAULT_SYSTEM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant for the Python standard library.<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

QA = [
    ("How do I join path parts?", "Use os.path.join(a, b) or pathlib.Path(a) / b."),
    ("How do I parse JSON text?", "Call json.loads(text); json.load(f) reads from a file."),
    ("How do I sort a list of dicts by a key?", "sorted(rows, key=operator.itemgetter('name'))."),
    ("How do I get the current time in UTC?", "datetime.datetime.now(datetime.timezone.utc)."),
    ("How do I count items?", "collections.Counter(items).most_common() lists them by count."),
    ("How do I run a shell command?", "subprocess.run(['ls', '-l'], check=True, capture_output=True)."),
    ("How do I make a temporary directory?", "with tempfile.TemporaryDirectory() as d: ..."),
    ("How do I read a CSV file?", "Open it with newline='' and iterate over csv.reader(f)."),
    ("How do I compute a sha256?", "hashlib.sha256(data).hexdigest()."),
    ("How do I parse command-line flags?", "Build an argparse.ArgumentParser and call parse_args()."),
    ("How do I copy a file?", "shutil.copy2(src, dst) keeps the metadata."),
    ("How do I match a regex?", "re.search(pattern, text) returns a match object or None."),
]

HELDOUT = [
    "The itertools module implements iterator building blocks such as chain, islice and groupby.",
    "functools.lru_cache memoizes a function's results, keyed by its arguments.",
    "The logging module lets libraries emit messages that applications configure with handlers.",
]


def build_upstream(recipe_path: Path, base_dir: Path, adapter_scale: float = 0.02, seed: int = 0,
                   chat_template: str = CHATML_TEMPLATE) -> None:
    """clean/ (train/eval/heldout_text) and train/adapter/ for the recipe, via stage_output."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from recipes import load_recipe
    from workbench.workspace import stage_output

    recipe = load_recipe(recipe_path)
    records = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    with stage_output(recipe, "clean") as out:
        Dataset.from_dict({"messages": records[:10]}).save_to_disk(str(out.dir / "train"))
        Dataset.from_dict({"messages": records[10:]}).save_to_disk(str(out.dir / "eval"))
        Dataset.from_dict({"text": HELDOUT}).save_to_disk(str(out.dir / "heldout_text"))
        out.results = {"counts": {"train": 10, "eval": 2, "heldout_text": len(HELDOUT)},
                       "fingerprints": {"train": "t", "eval": "e", "heldout_text": "h"}}

    with stage_output(recipe, "train") as out:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tokenizer.chat_template = chat_template
        tokenizer.eos_token = "<|im_end|>"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        # a non-trivial adapter (B != 0) so that the merge really changes the weights; small, so the model
        # still answers like itself
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(adapter_scale)
        adapter = out.dir / "adapter"
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(adapter)
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = recipe.base_model.label
        (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        out.results = {"method": "lora", "steps": 0, "train_loss": 0.0, "eval_perplexity": 0.0,
                       "base_eval_perplexity": 0.0, "mlflow_run_id": None}


def rewrite_gguf(src: Path, dst: Path, fields: dict) -> None:
    """Copy a GGUF file with some metadata fields replaced (value) or removed (None): for broken-file tests."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in fields:
            value = fields[key]
            if value is None:
                continue
        else:
            value = fld.contents()
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_recipe(tmp: Path, base_dir: Path, name: str, quantize: dict | None = None) -> Path:
    """The demo recipe with its workspace in tmp/runs, this base, and (optionally) other quantize targets."""
    import yaml

    from workbench.base import weight_hashes

    data = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    data.update(name=name, workspace=str(tmp / "runs"))
    data["base_model"] = {"path": str(base_dir), "sha256": weight_hashes(base_dir)}
    if quantize is not None:
        data["quantize"] = quantize
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_quantize(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m quantize RECIPE`, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "quantize", str(recipe), *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
