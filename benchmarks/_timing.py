"""Shared helpers for the standalone benchmarks: the arena's timing primitives plus a subprocess
runner and Markdown table printing. Not a benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys

from attnzoo.arena.timing import (  # noqa: F401 (re-exported for the benchmarks)
    MiB,
    Stats,
    cpu_model,
    header,
    interleaved,
    load_average,
    pin_threads,
    release_free_memory,
    reset_peak,
    status_bytes,
)


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


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
