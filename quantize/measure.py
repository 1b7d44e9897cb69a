"""Wall time and peak resident memory of one step of the stage (sampled, so that each target gets its own peak
even though they run in one process; llama.cpp children report their own peak)."""
from __future__ import annotations

import contextlib
import threading
import time

from workbench.memory import rss_mb


@contextlib.contextmanager
def measured(interval: float = 0.05):
    """with measured() as m: ...  ->  m["seconds"], m["peak_rss_mb"] (raise m["peak_rss_mb"] for child peaks)."""
    m = {"seconds": 0.0, "peak_rss_mb": rss_mb()}
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            m["peak_rss_mb"] = max(m["peak_rss_mb"], rss_mb())

    t = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    t.start()
    try:
        yield m
    finally:
        stop.set()
        t.join()
        m["seconds"] = round(time.perf_counter() - start, 3)
        m["peak_rss_mb"] = round(max(m["peak_rss_mb"], rss_mb()), 1)
