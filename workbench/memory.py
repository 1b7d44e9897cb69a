"""Resident memory of this process, as Linux reports it (/proc), for the figures stages record."""
from __future__ import annotations

import os
import resource
import sys


def _status_mb(key: str) -> float | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    # no /proc (macOS): the process high-water mark is the best available figure (bytes there, KiB on Linux)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Resident memory now."""
    return _status_mb("VmRSS") or _maxrss_mb()


def peak_rss_mb() -> float:
    """This process's own peak: VmHWM, not getrusage(), because Linux carries the parent's high-water mark over
    fork+exec into ru_maxrss."""
    return _status_mb("VmHWM") or _maxrss_mb()
