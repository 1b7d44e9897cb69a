"""Real (tiny) stage outputs for the registry tests, written through the spine's stage_output.

clean/ (Arrow datasets), train/ (a real PEFT LoRA adapter of the tiny Llama + tokenizer, a real MLflow
run), quantize/ (a merged save_pretrained dir, an F16 GGUF written with the `gguf` package and a quantized
one, a Modelfile, and a compressed-tensors W4A16 dir when llm-compressor manages it), eval_gate/ (a
verdict.json we write, a report, a real MLflow run).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

CHATML_MODELFILE = '''FROM ./model-{qtype}.gguf
TEMPLATE """{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}
{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
PARAMETER temperature 0
'''


def build_stages(recipe_path: Path, tiny_model_dir: Path, passed: bool = True, awq: bool = True) -> dict:
    """Write clean/, train/, quantize/, eval_gate/ for the recipe; returns what was built."""
    from recipes import load_recipe

    recipe = load_recipe(recipe_path)
    built = {"recipe": recipe}
    with no_tracking_env():
        _clean(recipe)
        built["train_run_id"] = _train(recipe, tiny_model_dir)
        built["quant_types"], built["awq"] = _quantize(recipe, tiny_model_dir, awq)
        built["gate_run_id"] = _gate(recipe, passed)
    return built


def _clean(recipe) -> None:
    from datasets import Dataset

    from workbench.workspace import stage_output

    msgs = [[{"role": "user", "content": f"What does os.path.join {i} do?"},
             {"role": "assistant", "content": "It joins path components."}] for i in range(6)]
    with stage_output(recipe, "clean") as out:
        fps = {}
        for split, rows in (("train", msgs[:4]), ("eval", msgs[4:])):
            ds = Dataset.from_dict({"messages": rows})
            ds.save_to_disk(str(out.dir / split))
            fps[split] = ds._fingerprint
        ds = Dataset.from_dict({"text": ["The os module provides operating system interfaces."]})
        ds.save_to_disk(str(out.dir / "heldout_text"))
        fps["heldout_text"] = ds._fingerprint
        (out.dir / "report.json").write_text(json.dumps({"kept": 6}))
        out.results.update({"counts": {"train": 4, "eval": 2}, "fingerprints": fps})


def _train(recipe, tiny_model_dir: Path) -> str:
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.tracking import setup_mlflow
    from workbench.workspace import stage_output

    exp = setup_mlflow(recipe)
    with mlflow.start_run(experiment_id=exp, run_name="train") as run:
        mlflow.log_metric("train_loss", 1.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # init_lora_weights=False: a non-zero adapter, so merging it really changes the weights
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with stage_output(recipe, "train") as out:
        peft_model.save_pretrained(out.dir / "adapter", safe_serialization=True)
        tok.save_pretrained(out.dir / "adapter")
        (out.dir / "metrics.json").write_text(json.dumps({"train_loss": 1.5}))
        out.results.update({"method": "lora", "steps": 1, "train_loss": 1.5, "eval_perplexity": 10.0,
                            "base_eval_perplexity": 11.0, "mlflow_run_id": run.info.run_id})
    return run.info.run_id


def _quantize(recipe, tiny_model_dir: Path, awq: bool) -> tuple[list[str], bool]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.workspace import Workspace, stage_output

    ws = Workspace(recipe)
    adapter = ws.stage_dir("train") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(adapter)
    with stage_output(recipe, "quantize") as out:
        merged.save_pretrained(out.dir / "merged", safe_serialization=True)
        tok.save_pretrained(out.dir / "merged")
        gguf_dir = out.dir / "gguf"
        gguf_dir.mkdir()
        write_llama_gguf(merged, gguf_dir / "model-F16.gguf")
        qtype = quantize_gguf(gguf_dir / "model-F16.gguf", gguf_dir)
        (gguf_dir / "Modelfile").write_text(CHATML_MODELFILE.format(qtype=qtype))
        artifacts = [{"name": "merged", "format": "hf", "path": "merged", "parent": None},
                     {"name": "gguf:F16", "format": "gguf", "path": "gguf/model-F16.gguf", "parent": "merged"},
                     {"name": f"gguf:{qtype}", "format": "gguf", "path": f"gguf/model-{qtype}.gguf", "parent": "gguf:F16"}]
        made_awq = awq and write_compressed_tensors(out.dir / "merged", out.dir / "awq")
        if made_awq:
            artifacts.append({"name": "awq", "format": "compressed-tensors", "path": "awq", "parent": "merged"})
        out.results["artifacts"] = artifacts
    return ["F16", qtype], made_awq


def _gate(recipe, passed: bool) -> str:
    import mlflow

    from workbench.tracking import setup_mlflow
    from workbench.workspace import Workspace, manifest_hash, stage_output

    ws = Workspace(recipe)
    exp = setup_mlflow(recipe)
    with mlflow.start_run(experiment_id=exp, run_name="eval_gate") as run:
        mlflow.log_metric("golden_pass_rate", 0.8)
    checks = [
        {"name": "golden_pass_rate", "artifact": None, "value": 0.8, "threshold": 0.5, "passed": passed, "gating": True},
        {"name": "kld", "artifact": "gguf:F16", "value": 0.001, "threshold": 0.05, "passed": True, "gating": True},
        {"name": "pii_leaks", "artifact": "adapter", "value": 0, "threshold": 0, "passed": True, "gating": True},
        {"name": "cost_note", "artifact": None, "value": "informational", "threshold": None, "passed": True,
         "gating": False},
    ]
    with stage_output(recipe, "eval_gate") as out:
        verdict = {"passed": passed, "candidate_manifest_sha256": manifest_hash(ws.stage_dir("quantize") / "manifest.json"),
                   "checks": checks}
        (out.dir / "verdict.json").write_text(json.dumps(verdict, indent=2))
        (out.dir / "report.md").write_text("# Eval gate report\n\nGolden pass rate: 0.80 (threshold 0.50)\n")
        out.results["mlflow_run_id"] = run.info.run_id
        out.results["passed"] = passed
    return run.info.run_id


# --- GGUF of a Llama, written with the `gguf` package (the layout llama.cpp's converter produces) ---

def write_llama_gguf(model, path: Path) -> None:
    """An F16 GGUF of a HF Llama model with the SmolLM2 tokenizer copied from the shipped SmolLM2 GGUF."""
    import gguf

    from workbench.base import _gguf_fields, smollm2_gguf_path

    cfg = model.config
    fields = _gguf_fields(smollm2_gguf_path())
    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fields.get("tokenizer.ggml.pre", "smollm"))
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_token_merges(fields["tokenizer.ggml.merges"])
    w.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(fields["tokenizer.ggml.tokens"].index("<|im_end|>"))
    w.add_pad_token_id(fields.get("tokenizer.ggml.padding_token_id", fields["tokenizer.ggml.bos_token_id"]))
    if "tokenizer.chat_template" in fields:
        w.add_chat_template(fields["tokenizer.chat_template"])

    def permute(t: np.ndarray, heads: int) -> np.ndarray:
        # HF stores rotary halves apart; llama.cpp wants them interleaved (same as convert_hf_to_gguf)
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float16))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].astype(np.float32))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"].astype(np.float16))
    names = {"self_attn.o_proj": "attn_output", "self_attn.v_proj": "attn_v", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"].astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"].astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads).astype(np.float16))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"].astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(f16: Path, out_dir: Path) -> str:
    """Q4_K_M with llama.cpp's own quantizer when llama-cpp-python is installed, else Q8_0 with the gguf package."""
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        dst = out_dir / "model-Q4_K_M.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc})")
        return "Q4_K_M"
    import gguf

    reader = gguf.GGUFReader(str(f16))
    dst = out_dir / "model-Q8_0.gguf"
    w = gguf.GGUFWriter(str(dst), "llama")
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
            continue
        vtype = fld.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = fld.types[-1]
            vals = [bytes(fld.parts[i]).decode() if sub == gguf.GGUFValueType.STRING else fld.parts[i].tolist()[0]
                    for i in fld.data]
            w.add_array(name, vals)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(name, bytes(fld.parts[fld.data[0]]).decode())
        else:
            w.add_key_value(name, fld.parts[fld.data[0]].tolist()[0], vtype)
    for t in reader.tensors:
        data = np.array(t.data)
        shape = tuple(int(x) for x in reversed(t.shape))
        data = data.reshape(shape)
        if data.dtype == np.float16 and data.ndim == 2:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return "Q8_0"


def write_compressed_tensors(merged_dir: Path, out: Path) -> bool:
    """A W4A16 (group 32) compressed-tensors directory of the merged model, via llm-compressor (data-free)."""
    try:
        import torch
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return False
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    oneshot(model=model, recipe=QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(merged_dir).save_pretrained(out)
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    return True


def write_recipe(root: Path, base_dir: Path, name: str, **overrides) -> Path:
    """A copy of the demo recipe with its workspace under root and the given base (what make_recipe does,
    usable from module-scoped fixtures)."""
    import yaml

    from workbench.base import weight_hashes

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    data = yaml.safe_load(demo.read_text())
    data["name"] = name
    data["workspace"] = str(root / "runs")
    data["base_model"] = {"path": str(base_dir), "sha256": weight_hashes(base_dir)}
    # the stages' freshness depends on the data files' content: tiny files of our own, not the repo's
    chat = {"messages": [{"role": "user", "content": "What does os.path.join do?"},
                         {"role": "assistant", "content": "It joins path components."}]}
    (root / "raw.jsonl").write_text(json.dumps(chat) + "\n")
    (root / "golden.jsonl").write_text(json.dumps(chat) + "\n")
    data["data"] = {**data["data"], "raw": str(root / "raw.jsonl"), "golden": str(root / "golden.jsonl"),
                    "build": None}
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def shared_stages(tmp_path_factory, tiny_model_dir: Path) -> dict:
    """Stage outputs built once per test session (recipe `reg`, embedded store) and shared by the registry
    test modules: a module that needs its own store copies the four stage directories (their manifests
    hold content hashes only, so a copy is as done as the original)."""
    root = tmp_path_factory.getbasetemp() / "registry-stages"
    marker = root / "built.json"
    if not marker.is_file():
        root.mkdir(exist_ok=True)
        recipe = write_recipe(root, tiny_model_dir, "reg", registry={"model_name": "reg-model"})
        built = build_stages(recipe, tiny_model_dir)
        built.pop("recipe")
        marker.write_text(json.dumps({**built, "recipe": str(recipe)}))
    return {**json.loads(marker.read_text()), "root": root}


def copy_stages(src_root: Path, dest_root: Path, name: str = "reg") -> None:
    for stage in ("clean", "train", "quantize", "eval_gate"):
        shutil.copytree(src_root / "runs" / name / stage, dest_root / "runs" / name / stage)


TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def subprocess_env(**extra: str) -> dict:
    """The environment for a command under test: mlflow.set_tracking_uri() in this process exports
    MLFLOW_TRACKING_URI, which would otherwise override the recipe's store in every child."""
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_ENV}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextlib.contextmanager
def no_tracking_env():
    """Run in-process code with no MLFLOW_TRACKING_URI set, and put back whatever was there."""
    saved = {k: os.environ.pop(k) for k in TRACKING_ENV if k in os.environ}
    try:
        yield
    finally:
        for k in TRACKING_ENV:
            os.environ.pop(k, None)
        os.environ.update(saved)


def derive_recipe(src: Path, root: Path, **overrides) -> Path:
    """A copy of the recipe `src` with its workspace under root and sections updated (same stage hashes for
    every section not overridden, whatever recipes/demo.yaml says by now)."""
    import yaml

    data = yaml.safe_load(Path(src).read_text())
    data["workspace"] = str(root / "runs")
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    path = root / Path(src).name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
