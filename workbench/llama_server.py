"""llama.cpp's own `llama-server`, built at install time from the pinned llama-cpp-python sdist.

`make install` runs `python -m workbench.llama_server install`: it extracts the sdist's vendored llama.cpp tree
(the same file the GGUF converters come from, `workbench.llama_sdist`), configures it with the Makefile's
portable CPU flags (LLAMA_CMAKE_ARGS in the environment), builds only the `llama-server` target, statically
linked, and puts the binary at `<venv>/bin/llama-server` (on PATH once the venv is active, so the launch lines
`wb pull` writes work as printed) with a stamp naming the sdist it came from. The web UI is not embedded
(that would download prebuilt assets at build time): the server answers the OpenAI-compatible API only.

Stdlib-only at import time.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .llama_sdist import LLAMA_CPP_PYTHON, SDIST_SHA256, TREE_PREFIX, install_or_where, sdist
from .workspace import sha256_file

# Everything but the server off; no UI assets fetched from the network; no HTTPS (the server binds loopback, or
# sits behind a TLS-terminating proxy); one self-contained binary.
BUILD_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_OPENSSL=OFF")


def binary_path() -> Path:
    return Path(sys.prefix) / "bin" / "llama-server"


def stamp_path() -> Path:
    return Path(sys.prefix) / "share" / f"llama-server-{LLAMA_CPP_PYTHON}.json"


def installed_binary() -> Path | None:
    """The llama-server built from the pinned sdist, or None (absent, or built from another source)."""
    try:
        stamp = json.loads(stamp_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    exe = binary_path()
    return exe if stamp.get("sdist_sha256") == SDIST_SHA256 and os.access(exe, os.X_OK) else None


def missing_binary_message() -> str:
    return (f"llama-server (llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON}) is not built at {binary_path()}; "
            "run `make install` (or `python -m workbench.llama_server install`), or serve with "
            "`--engine llama-cpp-python`")


def _extract_tree(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(TREE_PREFIX) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(TREE_PREFIX):] or "."
        tar.extractall(into, members=members, filter="data")
    return into


def build(archive: Path | None = None, cmake_args: str | None = None, jobs: int | None = None) -> Path:
    """Configure + build llama-server from the sdist's llama.cpp tree; install the binary and its stamp."""
    archive = sdist(archive)
    cmake_args = os.environ.get("LLAMA_CMAKE_ARGS", "") if cmake_args is None else cmake_args
    jobs = jobs or int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or 0) or os.cpu_count() or 1
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        src = _extract_tree(archive, Path(tmp) / "llama.cpp")
        build_dir = Path(tmp) / "build"
        configure = ["cmake", "-S", str(src), "-B", str(build_dir), *BUILD_FLAGS, *shlex.split(cmake_args)]
        print("llama-server: " + " ".join(configure), flush=True)
        subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], check=True,
                       stdout=subprocess.DEVNULL)
        built = build_dir / "bin" / "llama-server"
        exe = binary_path()
        tmp_exe = exe.with_name(exe.name + ".tmp")
        shutil.copy2(built, tmp_exe)
        os.replace(tmp_exe, exe)
    stamp_path().parent.mkdir(parents=True, exist_ok=True)
    stamp_path().write_text(json.dumps({
        "package": "llama-cpp-python", "version": LLAMA_CPP_PYTHON, "sdist_sha256": SDIST_SHA256,
        "cmake_args": [*BUILD_FLAGS, *shlex.split(cmake_args)], "binary_sha256": sha256_file(exe),
        "build_seconds": round(time.time() - started),
    }, indent=2) + "\n", encoding="utf-8")
    return exe


def main(argv: list[str] | None = None) -> int:
    return install_or_where("python -m workbench.llama_server", "llama-server", "Build llama.cpp's llama-server",
                            f"build it into {binary_path()} (LLAMA_CMAKE_ARGS: extra cmake flags)", build,
                            installed_binary, missing_binary_message, argv)


if __name__ == "__main__":
    sys.exit(main())
