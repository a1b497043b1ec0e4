"""The arena report's plots (matplotlib, Agg backend, PNG): time vs N per family, memory vs N,
fidelity error vs measured density. Each function returns the PNG bytes, or None when the rows hold
nothing to draw; :mod:`attnzoo.arena.report` writes and inlines them."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .analysis import FidelityGroup, Series, SeriesKey, is_peer, sdpa_series
from .store import Row

PASSES = (("fwd", "forward"), ("fwdbwd", "forward + backward"))
_PALETTE = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
_MARKERS = ("o", "^", "D", "v", "P")
_SDPA_STYLE = {"color": "black", "linewidth": 2.2, "marker": "s", "markersize": 4, "zorder": 5}
_DPI = 110


class Styles:
    """One colour and marker per curve label, the same in every plot of a report: labels are taken in
    sorted order, so each of the first ``len(_PALETTE)`` gets its own colour, later ones a new marker."""

    def __init__(self, labels: Iterable[str]):
        self._index = {label: i for i, label in enumerate(sorted(set(labels)))}

    def __call__(self, label: str, peer: bool = False) -> dict[str, Any]:
        index = self._index.get(label, len(self._index))
        marker = "x" if peer else _MARKERS[(index // len(_PALETTE)) % len(_MARKERS)]
        return {"color": _PALETTE[index % len(_PALETTE)], "marker": marker, "linestyle": ":" if peer else "-"}


def label_for(key: SeriesKey) -> str:
    name = key.method.removeprefix("peer:") + (" (peer)" if is_peer(key.method) else "")
    return name if key.variant in ("default", "") else f"{name} [{key.variant}]"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No Software metadata: it carries a URL, and the report holds none.
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def _plain(value: float) -> str:
    return f"{value:g}"


def _fraction(value: float) -> str:
    return f"1/{round(1 / value)}" if 0 < value < 1 else f"{value:g}"


def _plain_log_labels(axes: Axes) -> None:
    """Plain numbers on a log y axis; minor ticks at 2 and 5 are labelled when it spans under 2.5 decades."""

    def minor(value: float, _: int) -> str:
        low, high = axes.get_ylim()
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
        return _plain(value) if high / max(low, 1e-300) < 10**2.5 and mantissa in (2, 5) else ""

    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: _plain(value)))
    axes.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def _style_axes(axes: Axes, title: str, xlabel: str, ylabel: str, *, fractions: bool = False) -> None:
    """Log-log axes: N (or a density, as fractions) on a base-2 x axis, the value on a base-10 y axis."""
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: (_fraction if fractions else _plain)(value)))
    axes.set_yscale("log")
    axes.grid(True, which="major", alpha=0.35)
    axes.grid(True, which="minor", alpha=0.12)
    axes.spines[["top", "right"]].set_visible(False)


def _plot_series(axes: Axes, series: Series, values: Sequence[float | None], styles: Styles) -> bool:
    points = [(n, v) for n, v in zip(series.ns, values) if v is not None and v > 0]
    if not points:
        return False
    label = label_for(series.key)
    style = styles(label, peer=is_peer(series.key.method))
    axes.plot([p[0] for p in points], [p[1] for p in points], label=label, markersize=4, linewidth=1.5, **style)
    return True


def _legend(figure: Figure, axes: Sequence[Axes]) -> None:
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        columns = min(len(labels), 5)
        legend = [handles[label] for label in labels]
        figure.legend(legend, labels, loc="outside lower center", ncol=columns, fontsize=8, frameon=False)


def _figure(panels: int, columns: int, width: float, height: float) -> tuple[Figure, list[Axes]]:
    """A constrained-layout grid for ``panels`` axes (extra cells hidden) with room for a legend below."""
    columns = min(columns, panels)
    grid_rows = -(-panels // columns)
    figure, axes = plt.subplots(
        grid_rows, columns, figsize=(width * columns, height * grid_rows + 0.6), squeeze=False, layout="constrained"
    )
    figure.get_layout_engine().set(h_pad=0.12, hspace=0.04)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return figure, flat[:panels]


def time_plot(family: str, series: Sequence[Series], rows: Sequence[Row], styles: Styles) -> bytes | None:
    """Median time vs N (log-log) for one family's series, with SDPA (black) and peers (dotted):
    one panel per pass and mask mode present."""
    if all(s.key.method == "sdpa" for s in series):
        return None
    panels = [
        (pass_, title, causal)
        for causal in (False, True)
        for pass_, title in PASSES
        if any(s.key.pass_ == pass_ and s.key.causal == causal for s in series)
    ]
    if not panels:
        return None
    figure, axes = _figure(len(panels), 2, 6.0, 3.6)
    for ax, (pass_, title, causal) in zip(axes, panels):
        ns, times = sdpa_series(rows, pass_, causal)
        if ns:
            ax.plot(ns, times, label="SDPA (dense)", **_SDPA_STYLE)
        for found in series:
            if found.key.pass_ == pass_ and found.key.causal == causal and found.key.method != "sdpa":
                _plot_series(ax, found, found.values("median_s"), styles)
        _style_axes(ax, f"{title}, {'causal' if causal else 'non-causal'}", "sequence length N", "median time (s)")
    figure.suptitle(f"Time vs N: {family} family", fontsize=12, fontweight="bold")
    _legend(figure, axes)
    return _png(figure)


def memory_plot(series_by_family: dict[str, list[Series]], styles: Styles) -> bytes | None:
    """Peak extra memory (MiB) vs N, one panel per family: forward+backward where measured
    (else forward), non-causal where measured (else causal), SDPA from the same cells in black."""
    panels = []
    for family, series in series_by_family.items():
        measured = [s for s in series if any(v is not None for v in s.values("peak_extra_mib"))]
        if all(s.key.method == "sdpa" for s in measured):
            continue
        pass_ = "fwdbwd" if any(s.key.pass_ == "fwdbwd" for s in measured) else "fwd"
        causal = not any(s.key.pass_ == pass_ and not s.key.causal for s in measured)
        chosen = [s for s in measured if s.key.pass_ == pass_ and s.key.causal == causal]
        panels.append((family, pass_, causal, chosen))
    if not panels:
        return None
    figure, axes = _figure(len(panels), 3, 4.2, 3.3)
    for ax, (family, pass_, causal, chosen) in zip(axes, panels):
        sdpa: dict[int, float] = {}
        for found in chosen:
            own = "peak_extra_mib" if found.key.method == "sdpa" else "sdpa_peak_extra_mib"
            for n, mib in zip(found.ns, found.values(own)):
                if mib is not None and mib > 0:
                    sdpa.setdefault(n, mib)
            if found.key.method != "sdpa":
                _plot_series(ax, found, found.values("peak_extra_mib"), styles)
        if sdpa:
            ax.plot(sorted(sdpa), [sdpa[n] for n in sorted(sdpa)], label="SDPA (dense)", **_SDPA_STYLE)
        mode = ("fwd+bwd" if pass_ == "fwdbwd" else "fwd") + (", causal" if causal else "")
        _style_axes(ax, f"{family} ({mode})", "sequence length N", "peak extra memory (MiB)")
        _plain_log_labels(ax)
    figure.suptitle("Peak extra memory per call vs N", fontsize=12, fontweight="bold")
    _legend(figure, axes)
    return _png(figure)


def fidelity_plot(groups: Sequence[FidelityGroup], styles: Styles) -> bytes | None:
    """Relative error vs measured density for methods with a budget, one panel per (source, mode);
    MiniLM points are means over layers."""
    sparse = [g for g in groups if g.budget is not None and "density" in g.metrics and "rel_error" in g.metrics]
    panels: dict[tuple[str, bool], list[FidelityGroup]] = {}
    for group in sparse:
        panels.setdefault((group.source, group.causal), []).append(group)
    if not panels:
        return None
    figure, axes = _figure(len(panels), 2, 6.0, 3.6)
    for ax, ((source, causal), members) in zip(axes, sorted(panels.items())):
        curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for group in members:
            curves.setdefault((group.method, group.variant), []).append(
                (group.metrics["density"], group.metrics["rel_error"])
            )
        for (method, variant), points in curves.items():
            points = sorted(p for p in points if p[0] > 0 and p[1] > 0)
            if points:
                label = label_for(SeriesKey(method, variant, "", causal))
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label, markersize=4, **styles(label))
        title = f"{source}, {'causal' if causal else 'non-causal'}"
        _style_axes(ax, title, "measured density", "relative error", fractions=True)
    figure.suptitle("Fidelity: error vs density (sparse methods)", fontsize=12, fontweight="bold")
    _legend(figure, axes)
    return _png(figure)


# Content-selected methods solid with filled markers, fixed patterns dashed with open ones, the rest dotted.
_SWAP_GROUPS = {
    "content-selected": {"linestyle": "-", "marker": "o", "fillstyle": "full"},
    "fixed pattern": {"linestyle": "--", "marker": "s", "fillstyle": "none"},
    "other": {"linestyle": ":", "marker": "^", "fillstyle": "none"},
}


def swap_plot(curves: dict[int, dict[tuple[str, str], list[tuple[float, float]]]], styles: Styles) -> bytes | None:
    """Perplexity ratio to dense vs density, one panel per N: ``curves[N][(method, group)]`` holds
    ``(density, ratio)`` points, ``group`` one of ``"content-selected"``, ``"fixed pattern"`` or
    ``"other"`` (drawn solid, dashed and dotted)."""
    panels = {n: found for n, found in sorted(curves.items()) if any(found.values())}
    if not panels:
        return None
    figure, axes = _figure(len(panels), 2, 6.0, 3.8)
    for ax, (n, found) in zip(axes, panels.items()):
        lowest = min((p[0] for points in found.values() for p in points if p[0] > 0), default=1.0)
        # The budgets span 1/16 to 1/2: a fixed range keeps panels comparable when few points are drawn.
        ax.set_xlim(min(1 / 24, lowest / 1.5), 1.5)
        for (method, group), points in sorted(found.items(), key=lambda item: (item[0][1], item[0][0])):
            points = sorted(p for p in points if p[0] > 0 and p[1] > 0)
            if not points:
                continue
            label = f"{method} ({group})"
            style = {**styles(method), **_SWAP_GROUPS.get(group, _SWAP_GROUPS["other"])}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, markersize=5, linewidth=1.4, **style)
        ax.axhline(1.0, color="black", linewidth=1.0, label="dense")
        _style_axes(
            ax, f"SmolLM2-135M, N={n}", "density (share of allowed pairs)", "perplexity / dense", fractions=True
        )
        _plain_log_labels(ax)
    figure.suptitle("Swap: perplexity relative to dense vs density", fontsize=12, fontweight="bold")
    _legend(figure, axes)
    return _png(figure)
