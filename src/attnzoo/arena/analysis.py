"""Analysis of arena results: CAB's efficiency length, scaling exponents, speed series and
fidelity aggregates. Pure functions over :class:`~attnzoo.arena.store.Row` values; the report
(:mod:`attnzoo.arena.report`) renders what they return.

Every value a suite writes is optional here: a missing or non-numeric value is treated as
unknown, never as an error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .store import Row

# An intersection further out than this multiple of the largest measured N is not reported:
# a quadratic and a line fitted on a few noisy points cross somewhere, not necessarily anywhere real.
SANE_RANGE_FACTOR = 16.0


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class EfficiencyLength:
    """Where a method's time drops below the baseline's.

    ``length``: the smallest sequence length N from which the method is faster (0.0 when it is
    faster at every measured N). ``extrapolated``: True unless ``length`` was read between two
    measured lengths (0.0, or a crossing beyond the measured range from CAB's fits).
    """

    length: float
    extrapolated: bool


def _finite_points(ns: Sequence[float], *series: Sequence[Any]) -> list[tuple[float, ...]]:
    points = []
    for values in zip(ns, *series):
        converted = [number(v) for v in values]
        if all(v is not None and v > 0 for v in converted):
            points.append(tuple(converted))
    return sorted(points)


def efficiency_length(
    ns: Sequence[float], method_times: Sequence[Any], baseline_times: Sequence[Any]
) -> EfficiencyLength | None:
    """The efficiency length of a method against a baseline measured at the same lengths: the
    smallest N from which the method is faster.

    Where the measurements cross (slower at some N, faster at every larger measured N), it is
    read from them: the crossing of the time ratio interpolated in log-log between the two
    measured lengths around it. A method faster at every measured N gets 0.0 (flagged
    extrapolated). A method slower at the largest measured N gets CAB's fit: the baseline's times
    fitted with a quadratic in N, the method's with a line (dropping the smallest N when there are
    at least 4 points, as CAB drops L=256), and the smallest N beyond the measured range where the
    line goes below the quadratic, searched up to ``SANE_RANGE_FACTOR`` x the largest measured N.

    Args:
        ns: `[P]` sequence lengths.
        method_times: `[P]` the method's times (seconds) at ``ns``; None or non-finite entries are skipped
            (together with the baseline's time at the same N).
        baseline_times: `[P]` the baseline's times at ``ns``.

    Returns:
        An :class:`EfficiencyLength`, or None when there are fewer than 3 usable points or the method
        never beats the baseline within the range.

    Example: with ``t_base = 1e-9 N²`` and ``t_method = 1e-6 N`` the length is 1000.
    """
    if not len(ns) == len(method_times) == len(baseline_times):
        raise ValueError(
            f"ns, method_times and baseline_times: expected equal lengths, got "
            f"{len(ns)}, {len(method_times)} and {len(baseline_times)}"
        )
    points = _finite_points(ns, method_times, baseline_times)
    if len(points) < 3:
        return None
    n = np.array([p[0] for p in points])
    method = np.array([p[1] for p in points])
    baseline = np.array([p[2] for p in points])
    order = np.argsort(n)
    n, method, baseline = n[order], method[order], baseline[order]
    faster = method < baseline
    if faster.all():
        return EfficiencyLength(0.0, True)
    if faster[-1]:
        last_slower = int(np.flatnonzero(~faster)[-1])
        log_n = np.log(n[last_slower : last_slower + 2])
        log_ratio = np.log(method[last_slower : last_slower + 2] / baseline[last_slower : last_slower + 2])
        t = log_ratio[0] / (log_ratio[0] - log_ratio[1])
        return EfficiencyLength(float(np.exp(log_n[0] + t * (log_n[1] - log_n[0]))), False)
    quadratic = np.polyfit(n, baseline, 2)
    fit_from = 1 if len(points) >= 4 else 0
    line = np.polyfit(n[fit_from:], method[fit_from:], 1)
    # gap(N) > 0 where the method's fit is faster than the baseline's.
    gap = np.polysub(quadratic, np.pad(line, (1, 0)))
    upper = SANE_RANGE_FACTOR * float(n.max())
    roots = sorted(
        float(r.real) for r in np.roots(gap) if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real)) and 0 < r.real <= upper
    )
    # Test the sign of the gap between consecutive roots, not at them: touching roots do not count,
    # nor a gap within rounding of the fits' intercepts (a root near 0 from fitting exact curves).
    tolerance = 1e-9 * float(baseline.max())
    # Slower at the largest measured N: only a crossing beyond it counts.
    lower = float(n.max())
    edges = [lower, *(r for r in roots if r > lower), upper]
    for start, stop in itertools.pairwise(edges):
        if stop > start and np.polyval(gap, (start + stop) / 2) > tolerance:
            return EfficiencyLength(start, True)
    return None


def scaling_exponent(ns: Sequence[float], times: Sequence[Any]) -> float | None:
    """Least-squares slope of log(time) against log(N): 2 for quadratic cost, 1 for linear.

    Args:
        ns: `[P]` sequence lengths.
        times: `[P]` times at ``ns`` (non-positive, missing or non-finite entries are skipped).

    Returns:
        The slope, or None with fewer than 2 usable points at distinct N.
    """
    if len(ns) != len(times):
        raise ValueError(f"ns and times: expected equal lengths, got {len(ns)} and {len(times)}")
    points = _finite_points(ns, times)
    if len({p[0] for p in points}) < 2:
        return None
    log_n = np.log([p[0] for p in points])
    log_t = np.log([p[1] for p in points])
    return float(np.polyfit(log_n, log_t, 1)[0])


@dataclass(frozen=True)
class SeriesKey:
    """What identifies one curve of the speed plots: a method (or ``"sdpa"``, ``"peer:<name>"``),
    its backend, the pass (``"fwd"`` or ``"fwdbwd"``) and the mask mode."""

    method: str
    variant: str
    pass_: str
    causal: bool


@dataclass
class Series:
    """The ``ok`` speed rows of one :class:`SeriesKey`, one per N, sorted by N (the latest row wins
    when a length was measured twice)."""

    key: SeriesKey
    family: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ns(self) -> list[int]:
        return [int(row.cell.shape["N"]) for row in self.rows]

    def values(self, name: str) -> list[float | None]:
        """`[len(ns)]` the value ``name`` of every row, None where missing or not a finite number."""
        return [number(row.values.get(name)) for row in self.rows]

    def ratios(self) -> list[float | None]:
        """`[len(ns)]` the time relative to SDPA in the same cell (``ratio_vs_sdpa``, or computed)."""
        out = []
        for row in self.rows:
            ratio = number(row.values.get("ratio_vs_sdpa"))
            if ratio is None:
                median, sdpa = number(row.values.get("median_s")), number(row.values.get("sdpa_median_s"))
                ratio = median / sdpa if median is not None and sdpa else None
            out.append(ratio)
        return out

    def efficiency_length(self) -> EfficiencyLength | None:
        """Against SDPA timed interleaved in the same cells."""
        return efficiency_length(self.ns, self.values("median_s"), self.values("sdpa_median_s"))

    def scaling_exponent(self) -> float | None:
        return scaling_exponent(self.ns, self.values("median_s"))


def is_peer(method: str) -> bool:
    return method.startswith("peer:")


def speed_key(row: Row) -> SeriesKey | None:
    """The series a speed row belongs to, or None when its shape lacks N or the pass."""
    shape = row.cell.shape
    if number(shape.get("N")) is None or shape.get("pass") not in ("fwd", "fwdbwd"):
        return None
    return SeriesKey(row.cell.method, row.cell.variant, str(shape["pass"]), bool(shape.get("causal", False)))


def method_families(rows: Iterable[Row]) -> dict[str, str]:
    """``{method: family}`` from the rows' ``family`` values; a peer takes the family of the attnzoo
    method it ``matches`` when that one is known, SDPA is ``"exact"``."""
    rows = list(rows)
    families: dict[str, str] = {"sdpa": "exact"}
    for row in rows:
        family = row.values.get("family")
        if isinstance(family, str) and family and not is_peer(row.cell.method):
            families.setdefault(row.cell.method, family)
    for row in rows:
        if is_peer(row.cell.method) and row.cell.method not in families:
            matches, family = row.values.get("matches"), row.values.get("family")
            if isinstance(matches, str) and matches in families:
                families[row.cell.method] = families[matches]
            elif isinstance(family, str) and family:
                families[row.cell.method] = family
    return families


def speed_series(rows: Iterable[Row]) -> dict[SeriesKey, Series]:
    """Group ``ok`` speed rows into series per (method, variant, pass, causal), each sorted by N.

    Rows of another suite, with another status, or without a median time are left out.
    """
    rows = [row for row in rows if row.cell.suite == "speed"]
    families = method_families(rows)
    by_n: dict[SeriesKey, dict[int, Row]] = {}
    for row in rows:
        key = speed_key(row)
        if key is None or row.values.get("status") != "ok" or number(row.values.get("median_s")) is None:
            continue
        by_n.setdefault(key, {})[int(row.cell.shape["N"])] = row
    return {
        key: Series(key, families.get(key.method, "other"), [points[n] for n in sorted(points)])
        for key, points in sorted(by_n.items(), key=lambda item: _key_order(item[0]))
    }


def _key_order(key: SeriesKey) -> tuple:
    kind = 0 if key.method == "sdpa" else 2 if is_peer(key.method) else 1
    return (kind, key.method, key.variant, key.causal, key.pass_)


def sdpa_series(rows: Iterable[Row], pass_: str, causal: bool) -> tuple[list[int], list[float]]:
    """SDPA's median time per N for one pass and mode: from ``sdpa`` rows when present, else the
    median of the ``sdpa_median_s`` every speed cell timed beside its method."""
    rows = [row for row in rows if row.cell.suite == "speed"]
    series = speed_series(rows)
    for key, found in series.items():
        if key.method == "sdpa" and key.pass_ == pass_ and key.causal == causal:
            pairs = [(n, t) for n, t in zip(found.ns, found.values("median_s")) if t is not None]
            return [n for n, _ in pairs], [t for _, t in pairs]
    samples: dict[int, list[float]] = {}
    for found in series.values():
        if found.key.pass_ == pass_ and found.key.causal == causal:
            for n, t in zip(found.ns, found.values("sdpa_median_s")):
                if t is not None:
                    samples.setdefault(n, []).append(t)
    ns = sorted(samples)
    return ns, [float(np.median(samples[n])) for n in ns]


@dataclass(frozen=True)
class FidelityGroup:
    """Fidelity rows of one (source, method, variant, causal, budget), averaged over their cells
    (for MiniLM: over layers). ``metrics`` holds the mean of every metric that some row reports;
    ``per_layer`` maps a layer index to that layer's metrics."""

    source: str
    method: str
    variant: str
    causal: bool
    budget: float | None
    family: str
    statuses: tuple[str, ...]
    metrics: dict[str, float]
    per_layer: dict[int, dict[str, float]]


FIDELITY_METRICS = ("density", "rel_error", "cosine", "recall", "leak")


def _mean_metrics(rows: Sequence[Row]) -> dict[str, float]:
    out = {}
    for name in FIDELITY_METRICS:
        found = [v for v in (number(row.values.get(name)) for row in rows) if v is not None]
        if found:
            # The leak is a worst case: report the largest, not the mean.
            out[name] = max(found) if name == "leak" else float(np.mean(found))
    return out


def fidelity_groups(rows: Iterable[Row]) -> list[FidelityGroup]:
    """Aggregate fidelity rows per (source, method, variant, causal, budget), sorted for display.

    Only ``ok`` rows contribute metrics; every row's status is kept in ``statuses``.
    """
    grouped: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.cell.suite != "fidelity":
            continue
        shape = row.cell.shape
        key = (
            str(shape.get("source", "unknown")),
            row.cell.method,
            row.cell.variant,
            bool(shape.get("causal", False)),
            # Failed cells carry no values: their budget is the one they were configured with.
            number(row.values["budget"] if "budget" in row.values else row.cell.params.get("budget")),
        )
        grouped.setdefault(key, []).append(row)
    groups = []
    for (source, method, variant, causal, budget), members in grouped.items():
        ok = [row for row in members if row.values.get("status") == "ok"]
        layers: dict[int, list[Row]] = {}
        for row in ok:
            layer = row.cell.shape.get("layer")
            if isinstance(layer, int) and not isinstance(layer, bool):
                layers.setdefault(layer, []).append(row)
        family = next((r.values["family"] for r in members if isinstance(r.values.get("family"), str)), "other")
        groups.append(
            FidelityGroup(
                source,
                method,
                variant,
                causal,
                budget,
                family,
                tuple(str(row.values.get("status", "unknown")) for row in members),
                _mean_metrics(ok),
                {layer: _mean_metrics(found) for layer, found in sorted(layers.items())},
            )
        )
    groups.sort(key=lambda g: (g.source, g.causal, g.family, g.method, g.variant, -(g.budget or 2.0)))
    return groups
