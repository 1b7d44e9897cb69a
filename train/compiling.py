"""`train.compile`: each decoder layer compiled with torch.compile, and what compiling cost.

The decoder layers are compiled one by one (`module.compile()`), not the whole model: every layer runs the same
code, so dynamo compiles one graph and all layers share it, while the parts around them stay eager (trl's chunked
LM head indexes by a data-dependent mask, which would break a whole-model graph anyway). With the fixed token
budget every step has the same shapes, so that one graph is compiled in the first step and never again.

Evaluations run the layers eagerly (`torch.compiler.set_stance("force_eager")`): scoring without gradients would
need graphs of its own, a compile each for a few batches.

The backend is inductor. `TRAIN_COMPILE_BACKEND` names another one (`aot_eager` traces and runs the same graphs
without generating kernels; the tests use it on a CPU, where inductor needs a C++ toolchain and minutes).
"""
from __future__ import annotations

import os
import statistics

BACKEND_ENV = "TRAIN_COMPILE_BACKEND"


def compile_backend() -> str:
    return os.environ.get(BACKEND_ENV) or "inductor"


def decoder_layers(model) -> list:
    """The model's repeated blocks: modules whose class the model lists as not to be split across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_decoder_layers(model, backend: str) -> int:
    from workbench.workspace import StageError

    layers = decoder_layers(model)
    if not layers:
        raise StageError(f"train.compile: {type(model).__name__} names no decoder layer class (_no_split_modules); "
                         "set compile: false")
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


class CompileLog:
    """What torch.compile did from `start()` on: frames compiled, recompiles and their reasons, seconds spent."""

    def __init__(self):
        self._seen: set[int] = set()
        self._frames_at_start = 0

    def start(self) -> None:
        from torch._dynamo.utils import get_compilation_metrics

        self._seen = {id(m) for m in get_compilation_metrics()}
        self._frames_at_start = _frames_compiled()

    def frames(self) -> int:
        """Frames dynamo compiled since start() (a recompile counts as one more)."""
        return _frames_compiled() - self._frames_at_start

    def summary(self) -> dict:
        from torch._dynamo.utils import get_compilation_metrics

        new = [m for m in get_compilation_metrics() if id(m) not in self._seen]
        seconds = sum(m.entire_frame_compile_time_s or 0.0 for m in new if m.is_forward)
        seconds += sum((m.backward_cumulative_compile_time_us or 0) / 1e6 for m in new if not m.is_forward)
        reasons = [m.recompile_reason for m in new if m.is_forward and m.recompile_reason]
        return {"frames": self.frames(), "recompiles": len(reasons), "seconds": round(seconds, 3),
                "recompile_reasons": [r[:300] for r in reasons[:8]]}


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def step_summary(step_seconds: list[float]) -> dict:
    """First step (which compiles) apart from the steady steps after it."""
    if not step_seconds:
        return {"first_step_s": None, "median_step_s": None}
    rest = step_seconds[1:]
    return {"first_step_s": round(step_seconds[0], 4),
            "median_step_s": round(statistics.median(rest), 4) if rest else None}
