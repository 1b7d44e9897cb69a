"""The pinned llama-cpp-python source distribution: the one llama.cpp tree the project takes tools from.

`llama_cpp_python-<version>.tar.gz` vendors the llama.cpp sources the installed `llama_cpp` was built from.
`make install` fetches it once (pip download, pinned by version and sha256), keeps it in the virtual
environment, and takes from it both llama.cpp's GGUF converters (`quantize.gguf_convert install`) and the
`llama-server` binary (`workbench.llama_server install`), so the converter, the quantizer, the in-process
runtime and the server all agree. Nothing is fetched at run time.

Stdlib-only: imported by recipe validation and `wb --help` paths.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .workspace import sha256_file

LLAMA_CPP_PYTHON = "0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz as published on the package index (pip checks it on download too)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
# the llama.cpp tree inside the sdist
TREE_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"


def kept_sdist_path() -> Path:
    """Where the verified sdist is kept: inside the virtual environment that runs the workbench."""
    return Path(sys.prefix) / "share" / "llama-cpp-python-sdist" / SDIST_NAME


def download_sdist(into: Path) -> Path:
    """pip download of the pinned sdist; --require-hashes makes pip refuse any other file."""
    into.mkdir(parents=True, exist_ok=True)
    req = into / "requirements.txt"
    req.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "--require-hashes", "-r", str(req), "-d", str(into)], check=True)
    req.unlink()
    return into / SDIST_NAME


def check_sdist(path: Path) -> Path:
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not the pinned {SDIST_SHA256} of llama-cpp-python {LLAMA_CPP_PYTHON}")
    return path


def sdist(given: Path | None = None) -> Path:
    """The pinned sdist, sha256-checked: `given`, else the kept copy, else downloaded once and kept."""
    if given is not None:
        return check_sdist(given)
    kept = kept_sdist_path()
    if kept.is_file() and sha256_file(kept) == SDIST_SHA256:
        return kept
    kept.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kept.parent) as tmp:
        got = check_sdist(download_sdist(Path(tmp)))
        got.replace(kept)
    return kept


def install_or_where(prog: str, label: str, what: str, install_help: str, install: Callable[[Path | None], Path],
                     installed: Callable[[], Path | None], missing_message: Callable[[], str],
                     argv: list[str] | None = None) -> int:
    """The command line of a tool taken from the sdist: `install [--sdist FILE]` makes it, `where` prints where it is
    (exit 1 when it is not there)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=f"{what} from the pinned llama-cpp-python sdist")
    sub = parser.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help=install_help)
    inst.add_argument("--sdist", type=Path, help=f"use this {SDIST_NAME} instead of the kept / downloaded one")
    sub.add_parser("where", help="print where it is (exit 1 when it is not there)")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        print(f"{label}: {install(args.sdist)}")
        return 0
    found = installed()
    print(found or missing_message())
    return 0 if found else 1
