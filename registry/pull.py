"""Pull one serving format of a registered version, verify every file, and say how to serve it.

Files are downloaded into a temporary directory next to DEST and verified there (sha256 against the
version's manifest, safetensors/GGUF only); only a fully verified set is moved into DEST.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

from workbench.workspace import StageError

from .files import SHA256_MANIFEST, verify_files
from .promote import download_version, load_sha_manifest
from .store import COMPLETE, STATUS_TAG, get_version, parse_model_uri

FORMATS = ("adapter", "merged", "awq", "gguf:<TYPE>", "gguf_adapter")


def format_paths(fmt: str, files: dict) -> list[str]:
    """The published paths (files or directory prefixes) that make up one serving format."""
    if fmt in ("adapter", "merged", "awq", "gguf_adapter"):
        return [f"{fmt}/"]
    m = re.fullmatch(r"gguf:([A-Za-z0-9_]+)", fmt)
    if m:
        paths = [f"gguf/model-{m.group(1)}.gguf"]
        if "gguf/Modelfile" in files:
            paths.append("gguf/Modelfile")
        return paths
    raise StageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def available_formats(files: dict) -> list[str]:
    out = [d for d in ("adapter", "merged", "awq", "gguf_adapter") if any(k.startswith(d + "/") for k in files)]
    out += [f"gguf:{m.group(1)}" for k in sorted(files) if (m := re.fullmatch(r"gguf/model-(.+)\.gguf", k))]
    return out


def pull(client, uri: str, fmt: str, dest: Path) -> dict:
    name, version, alias = parse_model_uri(uri)
    mv = get_version(client, name, version, alias)
    if mv.tags.get(STATUS_TAG) != COMPLETE:
        raise StageError(f"{uri} (v{mv.version}): {STATUS_TAG}={mv.tags.get(STATUS_TAG, '<unset>')}; "
                         "only completely published versions are pulled")
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".pull-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = load_sha_manifest(client, mv, staging / ".meta")
        files = manifest["files"]
        wanted = format_paths(fmt, files)
        for path in wanted:
            if not any(k == path or (path.endswith("/") and k.startswith(path)) for k in files):
                raise StageError(f"{uri} (v{mv.version}) has no {fmt}; it has: {', '.join(available_formats(files))}")
        root = staging / "files"
        root.mkdir()
        problems = []
        for path in wanted:
            # the download keeps the path below the version's root (root/gguf/model-Q4_K_M.gguf)
            download_version(client, name, mv.version, root, path.rstrip("/"))
            problems += verify_files(root, files, prefix=path)
        if problems:
            raise StageError(f"{uri} (v{mv.version}) {fmt}: refused, files do not verify:\n  " + "\n  ".join(problems))
        # verified: move into place (replacing an older pull of the same paths)
        for top in sorted({p.split("/", 1)[0] for p in wanted}):
            target = dest / top
            if target.exists():
                if top == "gguf":
                    for f in (root / top).iterdir():
                        os.replace(f, target / f.name)
                    continue
                shutil.rmtree(target)
            os.replace(root / top, target)
        (dest / SHA256_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    lines = launch_lines(name, mv, fmt, dest)
    write_launch_file(dest, f"{name} v{mv.version} ({uri})", fmt, lines)
    info = {"model": name, "version": mv.version, "format": fmt, "dest": str(dest), "launch": lines}
    return info


def write_launch_file(dest: Path, what: str, fmt: str, lines: list[str]) -> None:
    """launch.txt lists how to serve every format pulled into DEST (launch.json keeps them between pulls)."""
    state_path = dest / "launch.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state[fmt] = {"what": what, "lines": lines}
    state_path.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    text = [f"# every file below {dest} was verified against {SHA256_MANIFEST} when pulled", ""]
    for f, entry in sorted(state.items()):
        text += [f"## {f}: {entry['what']}", *entry["lines"], ""]
    (dest / "launch.txt").write_text("\n".join(text))


def launch_lines(name: str, mv, fmt: str, dest: Path) -> list[str]:
    """How to serve what was pulled: vLLM for HF formats, llama.cpp and Ollama for GGUF."""
    q = shlex.quote
    if fmt == "adapter":
        cfg = json.loads((dest / "adapter" / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path") or mv.tags.get("base_model", "BASE")
        base = base.split("@", 1)[0]  # a pinned hub label is id@revision; vLLM takes --revision separately
        rev = mv.tags.get("base_model.revision")
        return ["# vLLM (LoRA adapter on the pinned base)",
                f"vllm serve {q(base)}" + (f" --revision {rev}" if rev else "")
                + f" --enable-lora --max-lora-rank {cfg.get('r', 16)} --lora-modules {q(name)}={q(str(dest / 'adapter'))}"]
    if fmt == "merged":
        return ["# vLLM (merged full-precision model)", f"vllm serve {q(str(dest / 'merged'))} --served-model-name {q(name)}"]
    if fmt == "awq":
        return ["# vLLM (AWQ W4A16, compressed-tensors)",
                f"vllm serve {q(str(dest / 'awq'))} --quantization compressed-tensors --served-model-name {q(name)}"]
    if fmt == "gguf_adapter":
        d = dest / "gguf_adapter"
        return ["# llama.cpp (F16 base + GGUF LoRA adapter, applied at load time)",
                f"llama-server -m {q(str(d / 'base-F16.gguf'))} --lora {q(str(d / 'adapter-F16.gguf'))} --jinja",
                "# Ollama (the Modelfile's FROM + ADAPTER)", f"ollama create {q(name.lower())} -f {q(str(d / 'Modelfile'))}"]
    qtype = fmt.split(":", 1)[1]
    gguf = dest / "gguf" / f"model-{qtype}.gguf"
    lines = ["# llama.cpp", f"llama-server -m {q(str(gguf))} --jinja"]
    modelfile = dest / "gguf" / "Modelfile"
    if modelfile.is_file():
        text = modelfile.read_text()
        if not re.search(rf"^FROM\s+\S*model-{re.escape(qtype)}\.gguf\s*$", text, re.M):
            # the published Modelfile points at another quant type: write one for this type beside it
            modelfile = dest / "gguf" / f"Modelfile.{qtype}"
            modelfile.write_text(re.sub(r"^FROM\s+.*$", f"FROM ./model-{qtype}.gguf", text, count=1, flags=re.M))
        lines += ["# Ollama", f"ollama create {q(name.lower())} -f {q(str(modelfile))}"]
    return lines
