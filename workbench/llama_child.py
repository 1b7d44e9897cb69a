"""llama.cpp in a child process: the one way every stage runs it.

llama.cpp calls abort() on some bad inputs (a broken tokenizer, a truncated file, a tensor type it cannot run),
which would kill the whole pipeline with no message. So each llama.cpp operation runs in a child process; the
parent turns a dead child into a StageError naming the file and quoting the child's own last words.

Protocol: the parent starts `python -m <module>` with one JSON request on stdin (`{"op": ..., ...}`); the child
module calls `serve(OPS)`, which runs `OPS[op](request)` and prints the JSON reply as the last line of stdout
(with the child's own peak RSS). Large results (log-prob arrays) go to a file the request names.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .memory import peak_rss_mb
from .workspace import StageError

_CRASH_HINTS = {
    signal.SIGILL: " (illegal instruction: this llama.cpp build uses CPU instructions the machine lacks; "
                   "rebuild llama-cpp-python for this CPU, e.g. CMAKE_ARGS='-DGGML_NATIVE=OFF')",
    signal.SIGABRT: " (llama.cpp aborted: a corrupt or truncated file, or a tensor type it cannot run)",
    signal.SIGSEGV: " (segmentation fault: a corrupt or truncated file)",
}
_REASON = re.compile(r"terminate|what\(\)|GGML_ASSERT|error|failed|abort", re.I)
_REPO = Path(__file__).resolve().parents[1]


def run_child(module: str, request: dict, label: str, timeout: float, timeout_hint: str = "") -> dict:
    """Run `request` in `python -m module`; the reply dict, or a StageError starting with `label` (the file)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1")  # an abort prints its reason, no gdb
    env.setdefault("OMP_NUM_THREADS", "1")
    op = request.get("op", "?")
    try:
        proc = subprocess.run([sys.executable, "-m", module], input=json.dumps(request), capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=str(_REPO))
    except subprocess.TimeoutExpired:
        raise StageError(f"{label}: llama.cpp {op} did not finish within {timeout:.0f}s{timeout_hint}") from None
    reply = _last_json_line(proc.stdout)
    if proc.returncode != 0 or reply is None:
        raise StageError(f"{label}: the llama.cpp child ({op}) {_how_it_died(proc.returncode)}; its last lines:\n    "
                         + _tail(proc.stderr))
    if "error" in reply:
        raise StageError(f"{label}: the llama.cpp child ({op}) failed: {reply['error']}")
    return reply


def _last_json_line(stdout: str) -> dict | None:
    lines = stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def _how_it_died(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}" if returncode else "gave no reply"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}{_CRASH_HINTS.get(-returncode, '')}"


def _tail(stderr: str) -> str:
    lines = [ln for ln in (stderr or "").splitlines() if ln.strip()]
    reasons = [ln for ln in lines if _REASON.search(ln)]
    return "\n    ".join((reasons or lines or ["(no output)"])[-6:])


# ---- child side ---------------------------------------------------------------------------------------------

def serve(ops: dict[str, Callable[[dict], dict]]) -> None:
    """The child's main: one request from stdin, one reply line on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        reply = ops[request["op"]](request)
    except (ValueError, RuntimeError, OSError) as exc:  # llama-cpp-python raises ValueError on a failed load
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    reply["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write("\n" + json.dumps(reply) + "\n")
    sys.stdout.flush()
