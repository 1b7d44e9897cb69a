"""The quantize stage: train/adapter -> quantize/{merged, gguf, awq} (see docs/stages.md, docs/quantization.md).

Read top to bottom: check everything that can be checked before any work (architecture, group size, chat
template family, and llama.cpp's converter on the tokenizer: a vocabulary-only GGUF whose template and tokens
must match HF's), merge, write the F16 GGUF with llama.cpp's converter and check its template/token parity,
quantize the other GGUF types from it, write the Modelfile, write the adapter as a GGUF adapter beside an F16
GGUF of the unmerged base, run AWQ, record every artifact in the manifest.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from recipes import Recipe
from recipes.sections.quantize import AWQTarget, GGUFAdapterTarget, GGUFTarget, architecture_problem
from workbench.base import resolve_base
from workbench.workspace import StageError, Workspace, stage_output

ADAPTER_REQUIRED = ("adapter_config.json", "tokenizer.json", "tokenizer_config.json")
# what llama.cpp's converter reads besides the weights: the model's config and the adapter's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json")


@dataclass
class Plan:
    base_dir: Path
    adapter_dir: Path
    config: dict
    gguf: GGUFTarget | None
    gguf_adapter: GGUFAdapterTarget | None
    awq: AWQTarget | None
    awq_group_size: int | None
    ollama_template: object | None  # ollama_template.OllamaTemplate
    gguf_chat_template: str | None


def run(recipe: Recipe, args) -> int:
    with stage_output(recipe, "quantize", force=args.force) as out:
        if out.skipped:
            print(f"quantize: {out.final_dir} is up to date (use --force to rebuild)")
            return 0
        # ---- setup: every check that does not need the model's weights, before any work ----------------
        ws = out.workspace
        plan = preflight(recipe, ws, ws.require("train") / "adapter")
        artifacts: list[dict] = []

        # ---- merged: full-precision base + adapter ------------------------------------------------------
        merged_dir = out.dir / "merged"
        if recipe.quantize.merge:
            artifacts.append(build_merged(recipe, plan, merged_dir))

        # ---- gguf: F16 from the merged weights, the other types from F16 by llama.cpp, Modelfile ---------
        if plan.gguf is not None:
            artifacts += build_gguf(recipe, plan, merged_dir, out.dir / "gguf")

        # ---- gguf_adapter: the LoRA as a GGUF adapter on an F16 GGUF of the unmerged base ----------------------
        if plan.gguf_adapter is not None:
            artifacts += build_gguf_adapter(recipe, plan, out.dir / "gguf_adapter")

        # ---- awq: W4A16 compressed-tensors calibrated on the cleaned domain data ---------------------------
        if plan.awq is not None:
            artifacts.append(build_awq(recipe, plan, ws, merged_dir, out.dir / "awq"))

        out.results["artifacts"] = artifacts
    print(f"quantize: wrote {out.final_dir}")
    for a in artifacts:
        bpw = f"{a['bits_per_weight']:.2f} bpw" if a["bits_per_weight"] is not None else "-"
        print(f"  {a['name']:<12} {bpw:>10} {a['size_bytes'] / 1e6:9.1f} MB {a['seconds']:8.1f} s "
              f"{a['peak_rss_mb']:8.0f} MB peak RSS")
    return 0


def preflight(recipe: Recipe, ws: Workspace, adapter_dir: Path) -> Plan:
    missing = [n for n in ADAPTER_REQUIRED if not (adapter_dir / n).is_file()]
    if missing:
        raise StageError(f"{adapter_dir}: missing {', '.join(missing)} (expected the train stage's adapter + tokenizer)")
    gguf = next((t for t in recipe.quantize.targets if isinstance(t, GGUFTarget)), None)
    gguf_adapter = next((t for t in recipe.quantize.targets if isinstance(t, GGUFAdapterTarget)), None)
    awq = next((t for t in recipe.quantize.targets if isinstance(t, AWQTarget)), None)
    base_dir = resolve_base(recipe.base_model)
    config = json.loads((base_dir / "config.json").read_text())
    problem = architecture_problem(config, needs_gguf=gguf is not None or gguf_adapter is not None,
                                   needs_awq=awq is not None)
    if problem:
        raise StageError(f"{base_dir}/config.json: {problem}")
    group_size = None
    if awq is not None:
        from .awq import choose_group_size

        group_size = choose_group_size(config, awq.group_size)
        ws.require("clean")  # the calibration data
    ollama, gguf_template = None, None
    if gguf is not None or gguf_adapter is not None:
        if gguf_adapter is not None:
            lora_problem(adapter_dir)
        from transformers import AutoTokenizer

        from workbench.chat import strip_generation_markers

        from .ollama_template import TemplateMismatch, ollama_template_for

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        try:
            ollama = ollama_template_for(tokenizer)
        except TemplateMismatch as exc:
            raise StageError(f"{adapter_dir}: {exc}") from None
        gguf_template = strip_generation_markers(tokenizer.chat_template)
        check_tokenizer_converts(recipe, base_dir, adapter_dir, tokenizer, ollama, gguf_template)
    return Plan(base_dir, adapter_dir, config, gguf, gguf_adapter, awq, group_size, ollama, gguf_template)


def converter_input(weights_dir: Path | None, config_dir: Path, tokenizer_dir: Path, base_dir: Path, into: Path) -> Path:
    """A directory llama.cpp's converter reads as one model: config.json (and weights, linked) of one
    directory with the tokenizer and template of another (the adapter's: what the fine-tune was trained with).
    A sentencepiece tokenizer.model comes from the base when the tokenizer directory lacks it (transformers
    does not write it back on save)."""
    into.mkdir(parents=True)
    (into / "config.json").symlink_to((config_dir / "config.json").resolve())
    for f in sorted(weights_dir.iterdir()) if weights_dir is not None else []:
        if f.suffix == ".safetensors" or f.name.endswith(".safetensors.index.json") or f.name == "generation_config.json":
            (into / f.name).symlink_to(f.resolve())
    for name in TOKENIZER_FILES:
        found = [d / name for d in (tokenizer_dir, base_dir) if (d / name).is_file()]
        if found and (name == "tokenizer.model" or found[0].parent == tokenizer_dir):
            shutil.copy2(found[0], into / name)
    return into


def check_tokenizer_converts(recipe: Recipe, base_dir: Path, adapter_dir: Path, tokenizer, ollama, gguf_template) -> None:
    """Before any work: llama.cpp's converter accepts the tokenizer, and the golden conversation gives the
    same token ids through HF, the GGUF's template and the Modelfile (on a vocabulary-only GGUF, in seconds)."""
    from .ollama_template import golden_conversation, modelfile_text
    from .gguf_export import write_vocab_gguf
    from .parity import template_parity

    with tempfile.TemporaryDirectory(prefix="wb-vocab-") as tmp:
        view = converter_input(None, base_dir, adapter_dir, base_dir, Path(tmp) / "model")
        vocab = Path(tmp) / "vocab.gguf"
        write_vocab_gguf(view, vocab, gguf_template, name=recipe.name, eot_token=ollama.stop[0])
        modelfile = modelfile_text("vocab.gguf", modelfile_template(ollama, vocab), {})
        parity = template_parity(tokenizer, vocab, modelfile, golden_conversation())
    if parity["mismatches"]:
        raise StageError(f"{adapter_dir}: the chat template does not tokenize the same through llama.cpp: "
                         + "; ".join(parity["mismatches"]))


def modelfile_template(ollama, gguf_path: Path):
    """The Ollama template for a GGUF: Ollama adds BOS only where the GGUF says to, so a BOS the HF template
    writes must be in the Go template when the GGUF's tokenizer does not add one."""
    from .llama_ops import run_llama

    if ollama.bos_text and not run_llama("chat_tokens", gguf_path, texts=[], timeout=600)["add_bos"]:
        return dataclasses.replace(ollama, template=ollama.bos_text + ollama.template)
    return ollama


def lora_problem(adapter_dir: Path) -> None:
    """llama.cpp applies a LoRA as alpha/r * B @ A: DoRA's magnitudes and rsLoRA's alpha/sqrt(r) are not that."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise StageError(f"{adapter_dir}/adapter_config.json: a DoRA adapter cannot be served as a llama.cpp LoRA "
                         "(gguf_adapter); merge it instead (kind: gguf)")
    if cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise StageError(f"{adapter_dir}/adapter_config.json: rsLoRA and per-module ranks/alphas are not scaled "
                         "the way llama.cpp scales a LoRA (gguf_adapter); merge it instead (kind: gguf)")


def build_merged(recipe: Recipe, plan: Plan, merged_dir: Path) -> dict:
    from .measure import measured
    from .merge import merge_adapter

    with measured() as m:
        check = merge_adapter(plan.base_dir, plan.adapter_dir, merged_dir, recipe.quantize.merge_dtype,
                              recipe.quantize.merge_check_tolerance)
    print(f"quantize: merged (max |logit diff| vs base+adapter {check['max_abs_logit_diff']:.2e})", file=sys.stderr)
    return artifact("merged", "hf", "merged", None, None, dir_size(merged_dir), m,
                    merge_check=check, dtype=recipe.quantize.merge_dtype,
                    quantizer={"peft": metadata.version("peft"), "transformers": metadata.version("transformers")})


def build_gguf(recipe: Recipe, plan: Plan, merged_dir: Path, gguf_dir: Path) -> list[dict]:
    from transformers import AutoTokenizer

    from .gguf_export import gguf_summary, write_f16_gguf
    from .llama_ops import run_llama
    from .measure import measured
    from .ollama_template import golden_conversation, modelfile_text
    from .parity import template_parity

    gguf_dir.mkdir(parents=True)
    versions = gguf_versions()
    f16 = gguf_dir / "model-F16.gguf"
    with measured() as m, tempfile.TemporaryDirectory(prefix="wb-convert-") as tmp:
        view = converter_input(merged_dir, merged_dir, plan.adapter_dir, plan.base_dir, Path(tmp) / "model")
        write_f16_gguf(view, f16, plan.gguf_chat_template, name=recipe.name, eot_token=plan.ollama_template.stop[0])
    summaries = {"F16": (gguf_summary(f16), m)}
    for gtype in plan.gguf.types[1:]:
        path = gguf_dir / f"model-{gtype}.gguf"
        with measured() as m:
            reply = run_llama("quantize", f16, output=str(path), type=gtype)
        m["peak_rss_mb"] = round(max(m["peak_rss_mb"], reply["peak_rss_mb"]), 1)
        summaries[gtype] = (gguf_summary(path), m)

    # Ollama: FROM the smallest file; the template family found in preflight; sampling from generation_config
    smallest = min(plan.gguf.types, key=lambda t: (gguf_dir / f"model-{t}.gguf").stat().st_size)
    modelfile = modelfile_text(f"model-{smallest}.gguf", modelfile_template(plan.ollama_template, f16),
                               ollama_parameters(merged_dir, plan.config))
    (gguf_dir / "Modelfile").write_text(modelfile)

    # the golden conversation must tokenize identically through HF, the GGUF's template and the Modelfile
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    parity = template_parity(tokenizer, f16, modelfile, golden_conversation())
    if parity["mismatches"]:
        raise StageError(f"{f16}: chat template parity failed for the golden conversation: "
                         + "; ".join(parity["mismatches"]))

    f16_bytes = f16.stat().st_size
    out = []
    for gtype, (summary, m) in summaries.items():
        path = gguf_dir / f"model-{gtype}.gguf"
        out.append(artifact(
            f"gguf:{gtype}", "gguf", f"gguf/{path.name}", "merged", summary["bits_per_weight"], path.stat().st_size, m,
            size_ratio_vs_f16=round(path.stat().st_size / f16_bytes, 4), tensor_types=summary["tensor_types"],
            quantized_from=None if gtype == "F16" else "gguf:F16", quantizer=versions,
            template_family=plan.ollama_template.family,
            parity={"golden_tokens": len(parity["ids"]["hf"]), "routes": list(parity["ids"])} if gtype == "F16" else None,
        ))
    return out


def gguf_versions() -> dict:
    from .gguf_convert import LLAMA_CPP_PYTHON

    return {"gguf": metadata.version("gguf"), "llama_cpp_python": metadata.version("llama_cpp_python"),
            "converter": f"convert_hf_to_gguf.py of llama-cpp-python {LLAMA_CPP_PYTHON}"}


def build_gguf_adapter(recipe: Recipe, plan: Plan, out_dir: Path) -> list[dict]:
    """base-F16.gguf (the unmerged base, with the adapter's tokenizer and template), adapter-F16.gguf (the LoRA,
    by convert_lora_to_gguf.py), a Modelfile with FROM + ADAPTER; parity and an adapter-applied check."""
    from transformers import AutoTokenizer

    from .ollama_template import golden_conversation, modelfile_text
    from .gguf_convert import convert_lora_to_gguf
    from .gguf_export import gguf_summary, write_f16_gguf
    from .measure import measured
    from .parity import template_parity

    out_dir.mkdir(parents=True)
    base, lora = out_dir / "base-F16.gguf", out_dir / "adapter-F16.gguf"
    with tempfile.TemporaryDirectory(prefix="wb-convert-") as tmp:
        view = converter_input(plan.base_dir, plan.base_dir, plan.adapter_dir, plan.base_dir, Path(tmp) / "model")
        with measured() as m_base:
            write_f16_gguf(view, base, plan.gguf_chat_template, name=recipe.name, eot_token=plan.ollama_template.stop[0])
        with measured() as m_lora:
            convert_lora_to_gguf(plan.adapter_dir, view, lora, outtype="f16")
    modelfile = modelfile_text(base.name, modelfile_template(plan.ollama_template, base),
                               ollama_parameters(plan.adapter_dir, plan.config))
    modelfile = modelfile.replace(f"FROM ./{base.name}\n", f"FROM ./{base.name}\nADAPTER ./{lora.name}\n", 1)
    (out_dir / "Modelfile").write_text(modelfile)

    tokenizer = AutoTokenizer.from_pretrained(plan.adapter_dir)
    parity = template_parity(tokenizer, base, modelfile, golden_conversation())
    if parity["mismatches"]:
        raise StageError(f"{base}: chat template parity failed for the golden conversation: " + "; ".join(parity["mismatches"]))
    check = lora_applied_check(plan, base, lora, parity["ids"]["hf"], out_dir)
    print(f"quantize: gguf_adapter (KLD vs base+adapter in transformers {check['kld_vs_adapter']:.2e}, "
          f"base alone {check['kld_base_alone']:.2e})", file=sys.stderr)
    summary, lora_summary = gguf_summary(base), gguf_summary(lora)
    common = dict(quantizer=gguf_versions(), template_family=plan.ollama_template.family)
    return [
        artifact("gguf_adapter", "gguf-lora", f"gguf_adapter/{lora.name}", "adapter", lora_summary["bits_per_weight"],
                 lora.stat().st_size, m_lora, base_path=f"gguf_adapter/{base.name}", modelfile="gguf_adapter/Modelfile",
                 lora_alpha=lora_summary["fields"].get("adapter.lora.alpha"), lora_check=check,
                 base_bits_per_weight=summary["bits_per_weight"], base_size_bytes=base.stat().st_size,
                 base_seconds=m_base["seconds"],
                 parity={"golden_tokens": len(parity["ids"]["hf"]), "routes": list(parity["ids"])}, **common),
    ]


def lora_applied_check(plan: Plan, base: Path, lora: Path, ids: list[int], work: Path) -> dict:
    """Next-token KLD on the golden conversation of llama.cpp's base+adapter against transformers'
    base+adapter, and of the base alone: an adapter that llama.cpp does not apply is no closer than the base."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .llama_ops import run_llama

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32),
                                      plan.adapter_dir).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    del model
    klds = {}
    for key, adapter in (("kld_vs_adapter", lora), ("kld_base_alone", None)):
        out = work / "logits.npy"
        run_llama("logits", base, ids=ids, out=str(out), lora=str(adapter) if adapter else None, timeout=1800)
        klds[key] = _mean_kld(ref, np.load(out).astype(np.float64))
        out.unlink()
    if not klds["kld_vs_adapter"] < klds["kld_base_alone"]:
        raise StageError(f"{lora}: llama.cpp with the adapter is no closer to base+adapter in transformers "
                         f"(KLD {klds['kld_vs_adapter']:.3g}) than the base alone ({klds['kld_base_alone']:.3g}): "
                         "the adapter is not applied as trained")
    return {**{k: round(v, 6) for k, v in klds.items()}, "tokens": len(ids)}


def _mean_kld(ref, test) -> float:
    import numpy as np

    def logsoftmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    lp, lq = logsoftmax(ref), logsoftmax(test)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def ollama_parameters(model_dir: Path, config: dict) -> dict[str, object]:
    gen = {}
    if (model_dir / "generation_config.json").is_file():
        gen = json.loads((model_dir / "generation_config.json").read_text())
    params: dict[str, object] = {}
    params["temperature"] = gen.get("temperature", 1.0) if gen.get("do_sample") else 0
    for key, name in (("top_p", "top_p"), ("top_k", "top_k"), ("repetition_penalty", "repeat_penalty"),
                      ("max_new_tokens", "num_predict")):
        if gen.get(key) is not None:
            params[name] = gen[key]
    params["num_ctx"] = min(int(config.get("max_position_embeddings", 2048)), 8192)
    return params


def build_awq(recipe: Recipe, plan: Plan, ws: Workspace, merged_dir: Path, awq_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from .awq import calibration_set, compressed_bits_per_weight, quantize_w4a16
    from .measure import measured

    with measured() as m:
        tokenizer = AutoTokenizer.from_pretrained(merged_dir)
        calib, digest = calibration_set(ws.require("clean"), tokenizer, plan.awq.calibration_samples,
                                        plan.awq.calibration_max_len, recipe.seed)
        quantize_w4a16(merged_dir, awq_dir, plan.awq_group_size, plan.awq.symmetric, calibration=calib,
                       max_len=plan.awq.calibration_max_len)
    return artifact(
        "awq", "compressed-tensors", "awq", "merged", compressed_bits_per_weight(awq_dir), dir_size(awq_dir), m,
        scheme=f"W4A16{'' if plan.awq.symmetric else '_ASYM'}", group_size=plan.awq_group_size,
        calibration={"source": "clean/train", "samples": len(calib), "max_len": plan.awq.calibration_max_len,
                     "sha256": digest},
        quantizer={"llmcompressor": metadata.version("llmcompressor"),
                   "compressed-tensors": metadata.version("compressed-tensors")},
    )


def artifact(name: str, fmt: str, path: str, parent: str | None, bpw: float | None, size: int, m: dict, **extra) -> dict:
    return {"name": name, "format": fmt, "path": path, "parent": parent, "bits_per_weight": bpw, "size_bytes": size,
            "seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"], **{k: v for k, v in extra.items() if v is not None}}


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
