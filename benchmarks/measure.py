"""Timing and peak-memory measurement on CPU and CUDA.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before.
- CPU: the resident-set high-water mark of the process (``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs``) minus the resident set before the call. glibc is told (``mallopt``) to serve every
  block of 64 KiB or more with ``mmap`` and to return freed memory at once, so the resident set follows the live
  tensor bytes and its high-water mark is their peak (plus the few MB of small-object heap). Linux only;
  elsewhere memory is reported as ``None``.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from collections.abc import Callable

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _configure_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16) == 1
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return ok
    except (OSError, AttributeError):
        return False


_CPU_PEAK_OK = _configure_glibc()
CPU_MEMORY_METHOD = (
    "peak resident set (VmHWM reset via /proc/self/clear_refs) with glibc mmap threshold 64 KiB"
    if _CPU_PEAK_OK
    else "unavailable on this platform"
)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by ``fn()`` above what was live before it (its result included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    if not _CPU_PEAK_OK:
        fn()
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    result = fn()
    peak = _status("VmHWM") - before
    del result
    return max(peak, 0)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
