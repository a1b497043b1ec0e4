"""Shared helpers for the benchmarks: thread pinning, an interleaved timing loop, peak-RSS
(VmHWM) reading on Linux and a one-line machine/version header. Not a benchmark itself."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import attnzoo

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
        f"torch {torch.__version__} | attnzoo {attnzoo.__version__} | python {platform.python_version()} | "
        f"threads {torch.get_num_threads()} (of {os.cpu_count()} CPUs) | CPU: {cpu_model()} | "
        f"load avg (1/5/15 min): {load_average()}"
    )


@dataclass(frozen=True)
class Stats:
    median: float
    min: float
    times: list[float]


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


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


# ---- peak memory (Linux /proc) ---------------------------------------------------------------


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


def child_runs(cmd: list[str], reps: int, env: dict[str, str] | None = None) -> list[dict] | dict:
    """Run ``cmd`` (a Python script that prints one ``RESULT {json}`` line) ``reps`` times, each in a
    fresh process (so no allocator cache of one measurement hides another's). Returns the parsed
    results, or ``{"error": ...}`` from the first process that failed or reported an error."""
    runs = []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, check=False, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            return {"error": f"subprocess failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}"}
        runs.append(json.loads(lines[-1][len("RESULT ") :]))
        if "error" in runs[-1]:
            return runs[-1]
    return runs


def md_header(cols: list[str]) -> None:
    """Print a Markdown table's header row and separator."""
    print("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|")


def md_row(cells: list[object]) -> None:
    print("| " + " | ".join(map(str, cells)) + " |")
