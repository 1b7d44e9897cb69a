"""Run a model behind an OpenAI-compatible HTTP API: the one way `wb serve` and the gate's load check start servers.

Engines:
    llama-server       llama.cpp's own server, built from the pinned sdist at install time (workbench.llama_server):
                       parallel slots and continuous batching. The default: it holds p95 latency under load
                       (docs/registry.md has the measured table).
    llama-cpp-python   the pinned llama-cpp-python's FastAPI server (workbench.llama_cpp_server): one request at a
                       time, no native binary to build.
    vllm               `vllm serve` for HF directories (merged, AWQ, base + LoRA), where vLLM is installed (a GPU).

Every engine gets the same things: the model file, the name clients ask for, 127.0.0.1 unless the caller allowed
another address and gave an API key, the key itself only through the environment (never on a command line, where
`ps` shows it, nor in a log), and the lineage (registered name, version, sha256 of the served file), which clients
read back in `/v1/models` (`tags`).
"""
from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .workspace import StageError

ENGINES = ("llama-server", "llama-cpp-python", "vllm")
DEFAULT_ENGINE = "llama-server"
LOOPBACK_NAMES = ("localhost",)


@dataclass
class ServeSpec:
    model: Path                      # a GGUF file (llama.cpp engines) or a model directory / hub id (vllm)
    name: str                        # the model id clients ask for
    host: str = "127.0.0.1"
    port: int = 8080
    api_key_env: str | None = None   # name of the environment variable holding the key (never the key)
    threads: int | None = None
    n_ctx: int = 2048                # context per request
    parallel: int = 4                # llama-server slots served at once (continuous batching)
    lora: Path | None = None         # a GGUF LoRA adapter applied at load time (llama.cpp)
    lineage: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)  # appended for llama-server and vllm (--enable-lora ...)

    @property
    def base_url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}/v1"

    def lineage_tags(self) -> list[str]:
        # llama-server takes tags comma-separated: keep the values free of commas
        return [f"{k}={str(v).replace(',', ';')}" for k, v in self.lineage.items()]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(api_key_env: str | None) -> str | None:
    """The key from the environment variable named api_key_env (None when no variable is named)."""
    if not api_key_env:
        return None
    value = os.environ.get(api_key_env, "")
    if not value.strip():
        raise StageError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is unset or empty")
    return value.strip()


def check_bind(host: str, allow_remote: bool, api_key_env: str | None) -> None:
    """Loopback by default; any other address needs the explicit flag and an API key."""
    if is_loopback(host):
        api_key(api_key_env)  # a named but empty variable is still a mistake worth stopping for
        return
    if not allow_remote:
        raise StageError(f"--host {host}: serving beyond this machine needs --allow-remote (and --api-key-env VAR); "
                         "the default is 127.0.0.1")
    if not api_key_env:
        raise StageError(f"--host {host} --allow-remote: an API key is required: set it in an environment variable "
                         "and pass its name with --api-key-env VAR")
    api_key(api_key_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


def resolve_engine(engine: str | None) -> str:
    """`auto`/None: llama-server when it is built, else llama-cpp-python (said on the console)."""
    from .llama_server import installed_binary

    if engine in (None, "auto"):
        if installed_binary() is not None:
            return DEFAULT_ENGINE
        print("serve: llama-server is not built (`make install` builds it); using llama-cpp-python's server, which "
              "answers one request at a time", file=sys.stderr)
        return "llama-cpp-python"
    if engine not in ENGINES:
        raise StageError(f"--engine {engine!r}: expected one of auto, {', '.join(ENGINES)}")
    return engine


def require_engine(engine: str) -> None:
    """A clear error, before anything is downloaded or started, when the engine cannot run here."""
    from .llama_server import installed_binary, missing_binary_message

    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise StageError("--engine vllm: vLLM is not installed in this environment. It needs a CUDA GPU: install it "
                         "there (pip install vllm) to serve merged / awq / adapter; on this machine serve a gguf "
                         "format with --engine llama-server")
    if engine == "llama-server" and installed_binary() is None:
        raise StageError(missing_binary_message())
    if engine not in ENGINES:
        raise StageError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")


def command(spec: ServeSpec, engine: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start `engine` on spec. The key travels in the environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_ARG_", "LLAMA_API_KEY", "VLLM_API_KEY"))}
    env.setdefault("OMP_NUM_THREADS", "1")
    key = api_key(spec.api_key_env)
    threads = str(spec.threads or default_threads())
    require_engine(engine)
    if engine == "llama-server":
        from .llama_server import installed_binary

        # flash attention off: the gate's in-process llama.cpp runs without it, and with it the greedy answers of
        # the served file drift from the ones the gate judged (measured: docs/registry.md)
        argv = [str(installed_binary()), "--flash-attn", "off", "-m", str(spec.model), "--host", spec.host,
                "--port", str(spec.port), "--alias", spec.name, "--jinja", "-t", threads, "-tb", threads,
                "-np", str(spec.parallel), "-c", str(context_per_request(spec) * spec.parallel)]
        if spec.lineage:
            argv += ["--tags", ",".join(spec.lineage_tags())]
        if spec.lora is not None:
            argv += ["--lora", str(spec.lora)]
        argv += spec.extra_args
        if key:
            env["LLAMA_API_KEY"] = key
    elif engine == "llama-cpp-python":
        argv = [sys.executable, "-m", "workbench.llama_cpp_server", "--model", str(spec.model), "--name", spec.name,
                "--host", spec.host, "--port", str(spec.port), "--threads", threads,
                "--n-ctx", str(context_per_request(spec)), "--lineage", json.dumps(spec.lineage)]
        if spec.lora is not None:
            argv += ["--lora", str(spec.lora)]
        if spec.api_key_env:
            argv += ["--api-key-env", spec.api_key_env]  # the variable's name; the child reads the value
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           env.get("PYTHONPATH")]))
    elif engine == "vllm":
        vllm = Path(sys.executable).with_name("vllm")
        argv = [str(vllm)] if vllm.is_file() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        # a LoRA directory is served under the model's name, on the base (then named NAME-base)
        served = spec.name if spec.lora is None else f"{spec.name}-base"
        argv += ["serve", str(spec.model), "--served-model-name", served, "--host", spec.host, "--port",
                 str(spec.port), *spec.extra_args]
        if spec.lora is not None:
            argv += ["--enable-lora", "--lora-modules", f"{spec.name}={spec.lora}"]
        if key:
            env["VLLM_API_KEY"] = key
    return argv, env


def context_per_request(spec: ServeSpec) -> int:
    """spec.n_ctx, but no longer than the GGUF was trained for (a longer context only adds warnings)."""
    if spec.model.suffix != ".gguf" or not spec.model.is_file():
        return spec.n_ctx
    from gguf import GGUFReader

    fields = GGUFReader(str(spec.model)).fields
    arch = fields.get("general.architecture")
    arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else "llama"
    trained = fields.get(f"{arch}.context_length")
    return min(spec.n_ctx, int(trained.parts[trained.data[0]][0])) if trained is not None else spec.n_ctx


class Server:
    """A started server process: `with Server(spec, engine, log_path) as srv:` waits until it answers
    /v1/models and stops it (SIGINT, then SIGTERM, then SIGKILL) on the way out."""

    def __init__(self, spec: ServeSpec, engine: str, log_path: Path | None = None):
        self.spec, self.engine, self.log_path = spec, engine, log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, ready_timeout: float = 180.0) -> "Server":
        argv, env = command(self.spec, self.engine)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        out = self._log if self._log is not None else None
        # its own session: a Ctrl-C on the terminal reaches us, and we stop the server in order
        self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.time() + timeout
        last = "no answer yet"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise StageError(f"{self.engine} exited with status {self.proc.returncode} before answering"
                                 f"{self._log_tail()}")
            try:
                models = get_models(self.spec.base_url, api_key(self.spec.api_key_env), timeout=5)
                if any(m.get("id") == self.spec.name for m in models.get("data", [])):
                    return models
                last = f"/v1/models lists {[m.get('id') for m in models.get('data', [])]}"
            except (OSError, ValueError) as exc:  # connection refused while loading, 503 while the model loads
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
        raise StageError(f"{self.engine} on {self.spec.base_url} did not answer within {timeout:.0f}s ({last})"
                         f"{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return "; its last lines:\n    " + "\n    ".join(lines[-8:]) if lines else ""

    def stop(self, grace: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (even by SIGKILL), so that a killed
    `wb serve` or gate leaves no server behind (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def get_models(base_url: str, key: str | None = None, timeout: float = 10) -> dict:
    """GET {base_url}/models, parsed (raises OSError / ValueError when the server does not answer it)."""
    req = urllib.request.Request(base_url.rstrip("/") + "/models")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code}") from None
