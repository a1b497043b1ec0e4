"""Timing and memory primitives of the arena (and the standalone benchmarks): thread pinning, an
interleaved timing loop (variants round-robin in one process, order reversed every other round),
the extra peak memory of a call (Linux: the RSS high-water mark reset through
``/proc/self/clear_refs``; elsewhere torch's profiler) and a machine/version header."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._version import __version__

MiB = 2**20


def pin_threads(threads: int) -> None:
    """Pin torch's intra-op thread pool (OpenMP/MKL) to ``threads`` threads."""
    torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def header() -> str:
    """torch / attnzoo / Python versions, threads, CPU model and load average, on one line."""
    return (
        f"torch {torch.__version__} | attnzoo {__version__} | python {platform.python_version()} | "
        f"threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs) | CPU: {cpu_model()} | "
        f"load avg (1/5/15 min): {load_average()}"
    )


@dataclass(frozen=True)
class Stats:
    """Per-call seconds of one variant: median, min, quartiles and every sample."""

    median: float
    min: float
    times: list[float]

    @property
    def q25(self) -> float:
        return _quantile(self.times, 0.25)

    @property
    def q75(self) -> float:
        return _quantile(self.times, 0.75)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 3, inner: int = 1
) -> dict[str, Stats]:
    """Time ``variants`` round-robin in this process, reversing the order every other round.

    Each round times every variant once; a sample is the mean of ``inner`` back-to-back calls
    (use ``inner > 1`` for calls of a few microseconds). Returns per-call seconds per variant.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            for _ in range(inner):
                variants[name]()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: Stats(statistics.median(t), min(t), t) for name, t in times.items()}


def status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the RSS high-water mark (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = status_bytes("VmHWM"), status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm - rss < MiB


def release_free_memory() -> None:
    """gc, then hand memory the C allocator keeps cached back to the OS (glibc ``malloc_trim``),
    so a warm-up call's freed buffers cannot silently absorb the next call's peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _profiled_peak(fn: Callable[[], object]) -> int:
    """Peak bytes torch's CPU allocator held during ``fn`` above its level at the start (the
    portable fallback where the RSS high-water mark cannot be reset)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: (e.time_range.start, e.time_range.end)
    )
    level = peak = 0
    for event in events:
        level += event.cpu_memory_usage
        peak = max(peak, level)
    return peak


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, str]:
    """Extra peak memory of one call of ``fn``, in bytes, and how it was measured.

    Linux: free memory is handed back to the OS, the RSS high-water mark is reset to the current
    RSS through ``/proc/self/clear_refs``, and ``VmHWM - VmRSS(before)`` is read after the call
    (``"vmhwm"``). Elsewhere: the peak of torch's CPU allocations under the profiler
    (``"profiler"``, which misses memory outside torch's allocator).
    """
    release_free_memory()
    if reset_peak():
        before = status_bytes("VmRSS")
        fn()
        after = status_bytes("VmHWM")
        if before is not None and after is not None:
            return max(0, after - before), "vmhwm"
    return _profiled_peak(fn), "profiler"
