"""Running the arena: validate the request, plan the cells, skip those already stored, measure the
rest one by one (each committed at once, so a killed run resumes losing at most the cell in
flight), show progress, then write the report.

Everything the request could get wrong (an unknown suite or method, a path that cannot be
written, a database from a newer schema, sizes that cannot fit in memory) is found before the
first cell runs and raised as :class:`ArenaError`; nothing is written then.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from ..registry import Method, get_method, methods
from . import fidelity, speed, swap
from .store import Cell, Store, StoreError

SUITES = ("speed", "fidelity", "swap")
DEFAULT_DB = Path("arena-results") / "arena.db"
DEFAULT_OUT = Path("arena-results")


class ArenaError(Exception):
    """A request the arena refuses before running anything (the CLI exits with code 2)."""


@dataclass(frozen=True)
class ArenaConfig:
    """What to run: suites, methods (None: every registered one), sizes (None: each suite's
    defaults), the quick settings, where to store and report, and the thread count."""

    suites: tuple[str, ...] = SUITES
    methods: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    quick: bool = False
    db: Path = DEFAULT_DB
    out: Path | None = DEFAULT_OUT
    threads: int = field(default_factory=lambda: min(os.cpu_count() or 1, 2))
    peers: bool = True


@dataclass(frozen=True)
class Planned:
    cell: Cell
    measure: Callable[[], dict[str, Any]]
    estimate: int


def _selected(config: ArenaConfig) -> list[Method]:
    if config.methods is None:
        return methods()
    unknown = [m for m in config.methods if m not in {x.name for x in methods()}]
    if unknown:
        raise ArenaError(f"--methods: unknown method(s) {unknown}; registered: {sorted(m.name for m in methods())}")
    return [get_method(m) for m in config.methods]


def _validate(config: ArenaConfig) -> None:
    unknown = [s for s in config.suites if s not in SUITES]
    if unknown or not config.suites:
        raise ArenaError(f"--suite: unknown suite(s) {unknown}; valid: {list(SUITES)}")
    if config.sizes is not None and (not config.sizes or any(n < 16 for n in config.sizes)):
        raise ArenaError(f"--sizes: sequence lengths must be integers >= 16, got {list(config.sizes)}")
    if config.threads < 1:
        raise ArenaError(f"--threads: must be >= 1, got {config.threads}")


def plan(config: ArenaConfig) -> list[Planned]:
    """The cells ``config`` asks for, each with how to measure it and its memory estimate."""
    _validate(config)
    chosen = _selected(config)
    planned: list[Planned] = []
    if "speed" in config.suites:
        speed_config = speed.QUICK if config.quick else speed.SpeedConfig()
        if config.sizes is not None:
            speed_config = replace(speed_config, sizes=config.sizes)
        for cell in speed.plan(chosen, speed_config, config.threads, with_peers=config.peers):
            planned.append(
                Planned(cell, _bind(speed.measure, cell, speed_config), speed.estimate_bytes(cell, speed_config))
            )
    if "fidelity" in config.suites:
        fidelity_config = fidelity.QUICK if config.quick else fidelity.FidelityConfig()
        for cell in fidelity.plan(chosen, fidelity_config, config.threads, sizes=config.sizes):
            planned.append(Planned(cell, _bind(fidelity.measure, cell, fidelity_config), fidelity.estimate_bytes(cell)))
    if "swap" in config.suites:
        swap_config = swap.QUICK if config.quick else swap.SwapConfig()
        for cell in swap.plan(chosen, swap_config, config.threads, sizes=config.sizes):
            planned.append(Planned(cell, _bind(swap.measure, cell, swap_config), swap.estimate_bytes(cell)))
    return planned


# Per suite: why a cell's inputs cannot be loaded here (a model package missing), else None.
_UNAVAILABLE: dict[str, Callable[[Cell], str | None]] = {"fidelity": fidelity.unavailable, "swap": swap.unavailable}


def _bind(fn: Callable[[Cell, Any], dict[str, Any]], cell: Cell, suite_config: Any) -> Callable[[], dict[str, Any]]:
    return lambda: fn(cell, suite_config)


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(planned: list[Planned], available: int | None) -> None:
    """Refuse cells whose estimated peak exceeds 80% of the available memory, naming them."""
    if available is None:
        return
    too_big = [p for p in planned if p.estimate > 0.8 * available]
    if too_big:
        worst = max(too_big, key=lambda p: p.estimate)
        raise ArenaError(
            f"--sizes: {len(too_big)} cell(s) would not fit in memory, e.g. {worst.cell.label()} needs about "
            f"{worst.estimate / 2**30:.1f} GiB of the {available / 2**30:.1f} GiB available; use smaller sizes"
        )


def check_writable(out: Path | None) -> None:
    """Create ``out`` and prove a file can be written there (nothing is left behind)."""
    if out is None:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".attnzoo-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ArenaError(f"--out: cannot write to {out}: {error.strerror or error}") from None


class Progress:
    """One line per cell on a terminal (rewritten in place), else a line every ``every`` seconds."""

    def __init__(self, total: int, stream: TextIO, every: float = 10.0):
        self.total, self.stream, self.every = total, stream, every
        self.start = self.last = time.perf_counter()
        self.tty = stream.isatty()

    def update(self, done: int, label: str) -> None:
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every and done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        width = 24
        bar = "#" * int(width * done / max(self.total, 1))
        line = f"[{bar:<{width}}] {done}/{self.total} {_fmt(elapsed)} elapsed, ~{_fmt(eta)} left | {label}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


@dataclass(frozen=True)
class RunSummary:
    planned: int
    skipped: int
    measured: int
    statuses: dict[str, int]
    seconds: float


def run(config: ArenaConfig, stream: TextIO = sys.stderr) -> RunSummary:
    """Run ``config``: validate, plan, measure the cells not yet stored, write the report."""
    planned = plan(config)
    check_memory(planned, available_memory())
    try:
        if config.db.exists():
            Store(config.db, readonly=True).close()
        check_writable(config.out)
        store = Store(config.db)
    except StoreError as error:
        raise ArenaError(str(error)) from None
    torch.set_num_threads(config.threads)
    # Everything alive now (torch, the registry) lives for the whole run: moving it out of the
    # collector's view makes the full collections before each memory measurement ~10x cheaper.
    gc.collect()
    gc.freeze()
    start = time.perf_counter()
    statuses: dict[str, int] = {}
    with store:
        todo = [p for p in planned if not store.has(p.cell)]
        skipped = len(planned) - len(todo)
        stream.write(
            f"arena: {len(planned)} cells ({', '.join(config.suites)}; {config.threads} threads); "
            f"{skipped} already in {config.db}, {len(todo)} to measure\n"
        )
        progress = Progress(len(todo), stream)
        for done, item in enumerate(todo, 1):
            progress.update(done - 1, item.cell.label())
            unavailable = _UNAVAILABLE[item.cell.suite](item.cell) if item.cell.suite in _UNAVAILABLE else None
            if unavailable:
                family = get_method(item.cell.method).family
                values = {"status": "not_installed", "message": unavailable, "family": family}
            else:
                values = item.measure()
            store.put(item.cell, values)
            statuses[values["status"]] = statuses.get(values["status"], 0) + 1
            progress.update(done, item.cell.label())
        if config.out is not None:
            from .report import write_report

            paths = write_report(store, config.out)
            stream.write(f"arena: report written to {paths.markdown} and {paths.html}\n")
    return RunSummary(len(planned), skipped, len(todo), statuses, time.perf_counter() - start)
