"""The quantize stage: train/adapter -> quantize/{merged, gguf, awq} (see docs/stages.md, docs/quantization.md).

Read top to bottom: check everything that can be checked before any work (architecture, group size, chat
template family, pre-tokenizer), merge, write the F16 GGUF and check its template/token parity, quantize the
other GGUF types from it, write the Modelfile, run AWQ, record every artifact in the manifest.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from recipes import Recipe
from recipes.sections.quantize import AWQTarget, GGUFTarget, architecture_problem
from workbench.base import resolve_base
from workbench.workspace import StageError, Workspace, stage_output

ADAPTER_REQUIRED = ("adapter_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass
class Plan:
    base_dir: Path
    adapter_dir: Path
    config: dict
    gguf: GGUFTarget | None
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
    awq = next((t for t in recipe.quantize.targets if isinstance(t, AWQTarget)), None)
    base_dir = resolve_base(recipe.base_model)
    config = json.loads((base_dir / "config.json").read_text())
    problem = architecture_problem(config, needs_gguf=gguf is not None)
    if problem:
        raise StageError(f"{base_dir}/config.json: {problem}")
    group_size = None
    if awq is not None:
        from .awq import choose_group_size

        group_size = choose_group_size(config, awq.group_size)
        ws.require("clean")  # the calibration data
    ollama, gguf_template = None, None
    if gguf is not None:
        from transformers import AutoTokenizer

        from workbench.chat import strip_generation_markers

        from .gguf_export import pre_tokenizer_name
        from .ollama_template import TemplateMismatch, ollama_template_for

        pre_tokenizer_name(json.loads((adapter_dir / "tokenizer.json").read_text()))
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        try:
            ollama = ollama_template_for(tokenizer)
        except TemplateMismatch as exc:
            raise StageError(f"{adapter_dir}: {exc}") from None
        gguf_template = strip_generation_markers(tokenizer.chat_template)
    return Plan(base_dir, adapter_dir, config, gguf, awq, group_size, ollama, gguf_template)


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
    versions = {"gguf": metadata.version("gguf"), "llama_cpp_python": metadata.version("llama_cpp_python")}
    f16 = gguf_dir / "model-F16.gguf"
    with measured() as m:
        write_f16_gguf(merged_dir, f16, plan.gguf_chat_template, name=recipe.name)
    summaries = {"F16": (gguf_summary(f16), m)}
    for gtype in plan.gguf.types[1:]:
        path = gguf_dir / f"model-{gtype}.gguf"
        with measured() as m:
            reply = run_llama("quantize", f16, output=str(path), type=gtype)
        m["peak_rss_mb"] = round(max(m["peak_rss_mb"], reply["peak_rss_mb"]), 1)
        summaries[gtype] = (gguf_summary(path), m)

    # Ollama: FROM the smallest file; the template family found in preflight; sampling from generation_config
    smallest = min(plan.gguf.types, key=lambda t: (gguf_dir / f"model-{t}.gguf").stat().st_size)
    modelfile = modelfile_text(f"model-{smallest}.gguf", plan.ollama_template,
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
