"""Wall time and peak resident memory of one step of the stage (sampled, so that each target gets its own peak
even though they run in one process; llama.cpp children report their own peak)."""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time


def current_rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # no /proc (macOS): the process high-water mark is the best available figure (bytes there, KiB on Linux)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def measured(interval: float = 0.05):
    """with measured() as m: ...  ->  m["seconds"], m["peak_rss_mb"] (raise m["peak_rss_mb"] for child peaks)."""
    m = {"seconds": 0.0, "peak_rss_mb": current_rss_mb()}
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            m["peak_rss_mb"] = max(m["peak_rss_mb"], current_rss_mb())

    t = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    t.start()
    try:
        yield m
    finally:
        stop.set()
        t.join()
        m["seconds"] = round(time.perf_counter() - start, 3)
        m["peak_rss_mb"] = round(max(m["peak_rss_mb"], current_rss_mb()), 1)
