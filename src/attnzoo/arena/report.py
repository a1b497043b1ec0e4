"""The arena report: ``report.md``, a self-contained ``report.html`` (inline CSS, plots as data
URIs, no external URL) and PNG plots, written from a results database.

The report is built once as a list of blocks (headings, paragraphs, tables, images: see
:mod:`attnzoo.arena.render`) and rendered twice, to Markdown and to HTML, so both always agree.
Every file is written to a temporary name in the output folder and renamed into place.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import plots
from .analysis import (
    FidelityGroup,
    Series,
    SeriesKey,
    fidelity_groups,
    is_peer,
    method_families,
    number,
    scaling_exponent,
    sdpa_series,
    speed_key,
    speed_series,
)
from .render import Block, Cell, Details, Heading, Image, Para, Table, Text, to_html, to_markdown
from .store import Row, Store

_BAD = ("wrong", "error")


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` wrote the report: the folder, the two pages and every plot."""

    out_dir: Path
    markdown: Path
    html: Path
    images: tuple[Path, ...]


@dataclass
class _Report:
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def _fmt(value: float | None, spec: str, *, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _budget(budget: float | None) -> str:
    if budget is None:
        return "—"
    inverse = 1 / budget if budget > 0 else 0
    return f"1/{round(inverse)}" if inverse >= 1 and abs(inverse - round(inverse)) < 1e-9 else f"{budget:.3g}"


def _status(statuses: Iterable[str]) -> Text:
    counts = Counter(statuses)
    if not counts:
        return Text("no cells", "muted")
    if set(counts) == {"ok"}:
        return Text("ok", "good")
    text = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return Text(text, "bad" if any(status in counts for status in _BAD) else "warn")


def _mode(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def _where(rows: Sequence[Row]) -> str:
    """The shapes of ``rows`` in one line, e.g. ``"N=256, 512 · pass=fwd · non-causal"``."""
    parts = []
    for name in ("source", "layer", "B", "H", "N", "D", "pass"):
        found = {v for row in rows if isinstance(v := row.cell.shape.get(name), (int, float, str))}
        if found:
            parts.append(f"{name}=" + ", ".join(str(v) for v in sorted(found, key=lambda v: (str(type(v)), v))))
    modes = sorted({_mode(bool(row.cell.shape.get("causal", False))) for row in rows})
    return " · ".join([*parts, *modes])


def _provenance(rows: Sequence[Row], db_path: Path) -> Table:
    def joined(values: Iterable[object]) -> str:
        found = sorted({str(v) for v in values})
        return ", ".join(found) if found else "—"

    stamps = [row.timestamp for row in rows]
    when = "—"
    if stamps:
        first, last = (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) for t in (min(stamps), max(stamps)))
        when = first if first == last else f"{first} to {last}"
    suites = Counter(row.cell.suite for row in rows)
    cells = ", ".join(f"{n} {suite}" for suite, n in sorted(suites.items()))
    entries = [
        ("Machine", joined(row.machine for row in rows)),
        ("Threads", joined(row.cell.threads for row in rows)),
        ("dtype", joined(row.cell.dtype for row in rows)),
        ("torch", joined(row.torch_version for row in rows)),
        ("attnzoo", joined(row.attnzoo_version for row in rows)),
        ("Git commit", joined(row.git_commit for row in rows)),
        ("Measured", when),
        ("Cells", f"{len(rows)}" + (f" ({cells})" if cells else "")),
        ("Database", str(db_path)),
        ("Report written", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
    ]
    return Table(("", ""), tuple((Text(name, "muted"), value) for name, value in entries))


def _problems(rows: Sequence[Row]) -> list[Block]:
    grouped: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        status = row.values.get("status")
        if status in _BAD:
            message = str(row.values.get("message") or "(no message)")
            key = (row.cell.suite, row.cell.method, row.cell.variant, str(status), message)
            grouped.setdefault(key, []).append(row)
    if not grouped:
        return [Para("No wrong or failed cells.", "good")]
    table = Table(
        ("Suite", "Method", "Backend", "Status", "Cells", "Where", "Message"),
        tuple(
            (suite, method, variant, Text(status.upper(), "bad"), str(len(members)), _where(members), message)
            for (suite, method, variant, status, message), members in sorted(grouped.items())
        ),
    )
    count = sum(map(len, grouped.values()))
    return [Para(f"{count} cell(s) gave a WRONG result or failed; they were not timed or scored.", "bad"), table]


def _ratio_cell(ratio: float | None) -> Cell:
    return "—" if ratio is None else Text(f"{ratio:.2f}×", "good" if ratio < 1 else "")


def _speed_table(pass_: str, rows: Sequence[Row], series: dict[SeriesKey, Series]) -> Table | None:
    in_pass = [row for row in rows if (key := speed_key(row)) is not None and key.pass_ == pass_]
    if not in_pass:
        return None
    ns = sorted({int(row.cell.shape["N"]) for row in in_pass})
    families = method_families(rows)
    groups: dict[SeriesKey, list[Row]] = {}
    for row in in_pass:
        groups.setdefault(speed_key(row), []).append(row)  # type: ignore[arg-type]
    table_rows = []
    for causal in sorted({key.causal for key in groups}):
        sdpa_s = dict(zip(*sdpa_series(rows, pass_, causal)))
        sdpa_ms = [_fmt(sdpa_s[n] * 1e3, ".3g", suffix=" ms") if n in sdpa_s else "—" for n in ns]
        exponent = _fmt(scaling_exponent(sorted(sdpa_s), [sdpa_s[n] for n in sorted(sdpa_s)]), ".2f")
        sdpa_row = (Text("SDPA time", "muted"), "exact", "default", _mode(causal), *sdpa_ms, "—", exponent)
        table_rows.append((*sdpa_row, "—", "—", "—"))
        for key in sorted((k for k in groups if k.causal == causal and k.method != "sdpa"), key=lambda k: k.method):
            found = series.get(key)
            ratios = dict(zip(found.ns, found.ratios())) if found else {}
            length = found.efficiency_length() if found else None
            if length is None:
                length_text = "—"
            elif found and length.length < min(found.ns):
                length_text = f"< {min(found.ns):,} (faster throughout)"
            else:
                length_text = f"{length.length:,.0f}" + (" (extrapolated)" * length.extrapolated)
            roofline = found.values("roofline")[-1] if found else None
            errors = [v for v in (number(row.values.get("check_error")) for row in groups[key]) if v is not None]
            table_rows.append(
                (
                    plots.label_for(SeriesKey(key.method, "default", pass_, causal)),
                    families.get(key.method, "other"),
                    key.variant,
                    _mode(causal),
                    *[_ratio_cell(ratios.get(n)) for n in ns],
                    length_text,
                    _fmt(found.scaling_exponent() if found else None, ".2f"),
                    _fmt(roofline * 100 if roofline is not None else None, ".1f", suffix=" %"),
                    _fmt(max(errors) if errors else None, ".1e"),
                    _status(str(row.values.get("status", "unknown")) for row in groups[key]),
                )
            )
    headers = ("Method", "Family", "Backend", "Mode", *[f"N={n}" for n in ns])
    headers += ("Eff. length", "Exponent", "Roofline", "Check error", "Status")
    return Table(headers, tuple(table_rows), numeric=range(4, len(headers) - 1))


def _speed_section(rows: Sequence[Row], out: _Report, styles: plots.Styles) -> None:
    out.add(Heading(2, "Speed and memory"))
    speed = [row for row in rows if row.cell.suite == "speed"]
    if not speed:
        out.add(Para("No speed cells in this database: run `attnzoo arena --suite speed`.", "warn"))
        return
    series = speed_series(speed)
    by_family: dict[str, list[Series]] = {}
    for found in series.values():
        by_family.setdefault(found.family, []).append(found)
    out.add(
        Para(
            "Times are medians over repeats; ratios are relative to SDPA timed interleaved in the same cell "
            "(below 1× is faster, in green). The efficiency length is CAB's: the N where a linear fit of the "
            "method's time drops below a quadratic fit of SDPA's. Roofline: achieved GFLOP/s over the "
            "matrix-multiply rate of the same run, at the largest N. Check error: relative error against "
            "the float64 reference, measured before timing."
        )
    )
    for pass_, title in plots.PASSES:
        table = _speed_table(pass_, speed, series)
        if table is not None:
            out.add(Heading(3, f"Time relative to SDPA: {title}"), table)
    if not series:
        out.add(Para("No speed cell finished with status ok: nothing to plot.", "warn"))
    for family, members in sorted(by_family.items()):
        png = plots.time_plot(family, members, speed, styles)
        if png is not None:
            out.add(Heading(3, f"Time vs N: {family}"), Image(f"time_{_slug(family)}.png", f"time vs N, {family}", png))
    memory = plots.memory_plot(dict(sorted(by_family.items())), styles)
    out.add(Heading(3, "Memory vs N"))
    out.add(Image("memory.png", "peak extra memory vs N", memory) if memory else Para("No memory measured.", "warn"))
    _peers(speed, out)


def _peers(speed: Sequence[Row], out: _Report) -> None:
    peers = [row for row in speed if is_peer(row.cell.method)]
    ran = {row.cell.method for row in peers if row.values.get("status") == "ok"}
    missing = {row.cell.method: row for row in peers if row.cell.method not in ran and row.values.get("status") != "ok"}
    settings = {row.cell.method: row.values.get("settings") for row in peers if row.values.get("settings")}
    if missing:
        out.add(
            Heading(3, "Peers not run"),
            Table(
                ("Peer", "Compared with", "Status", "Install / reason"),
                tuple(
                    (
                        name.removeprefix("peer:"),
                        str(row.values.get("matches") or "SDPA only"),
                        Text(str(row.values.get("status")), "warn"),
                        str(row.values.get("message") or "(no message)"),
                    )
                    for name, row in sorted(missing.items())
                ),
            ),
        )
    if settings:
        out.add(
            Heading(3, "Peer settings"),
            Table(("Peer", "Matched settings"), tuple((n.removeprefix("peer:"), str(s)) for n, s in settings.items())),
        )
    skipped = Counter(
        (row.cell.method, str(row.values.get("message") or ""))
        for row in speed
        if row.values.get("status") == "unsupported" and row.cell.method not in missing
    )
    if skipped:
        table = Table(("Method", "Cells", "Reason"), tuple((m, str(n), r) for (m, r), n in sorted(skipped.items())))
        out.add(Details(f"{sum(skipped.values())} unsupported cell(s) skipped", (table,)))


def _fidelity_row(group: FidelityGroup) -> tuple[Cell, ...]:
    metric = group.metrics.get
    return (
        group.method,
        group.family,
        group.variant,
        _mode(group.causal),
        _budget(group.budget),
        _fmt(metric("density"), ".3f"),
        _fmt(metric("rel_error"), ".2e"),
        _fmt(metric("cosine"), ".4f"),
        _fmt(metric("recall"), ".3f"),
        _fmt(metric("leak"), ".1e"),
        str(len(group.statuses)),
        _status(group.statuses),
    )


_FIDELITY_HEADERS = ("Method", "Family", "Backend", "Mode", "Budget", "Density", "Rel. error", "Cosine", "Recall")
_FIDELITY_HEADERS += ("Leak", "Cells", "Status")


def _fidelity_section(rows: Sequence[Row], out: _Report, styles: plots.Styles) -> None:
    out.add(Heading(2, "Fidelity"))
    groups = fidelity_groups(rows)
    if not groups:
        out.add(Para("No fidelity cells in this database: run `attnzoo arena --suite fidelity`.", "warn"))
        return
    out.add(
        Para(
            "Error of each method's output against exact attention on the same inputs: relative error and "
            "cosine (means over heads), attention-mass recall (sparse methods), density actually reached at "
            "the target budget (fraction of allowed pairs), and the causality leak (largest change of past "
            "outputs when the future is perturbed). MiniLM rows are means over layers (the leak: the maximum)."
        )
    )
    png = plots.fidelity_plot(groups, styles)
    if png is not None:
        out.add(Image("fidelity.png", "fidelity error vs density", png))
    for source in sorted({g.source for g in groups}):
        members = [g for g in groups if g.source == source]
        table = Table(_FIDELITY_HEADERS, tuple(map(_fidelity_row, members)), range(5, 11))
        out.add(Heading(3, f"Source: {source}"), table)
        layers = sorted({layer for g in members for layer in g.per_layer})
        if layers:
            per_layer = tuple(
                (
                    g.method,
                    g.variant,
                    _mode(g.causal),
                    _budget(g.budget),
                    *[_fmt(g.per_layer.get(layer, {}).get("rel_error"), ".2e") for layer in layers],
                )
                for g in members
            )
            headers = ("Method", "Backend", "Mode", "Budget", *[f"layer {layer}" for layer in layers])
            table = Table(headers, per_layer, range(4, len(headers)))
            out.add(Details(f"{source}: relative error per layer", (table,)))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "other"


def build_report(rows: Sequence[Row], db_path: Path) -> list[Block]:
    """The report's blocks for ``rows`` (any subset of a database, possibly empty)."""
    out = _Report()
    out.add(Heading(1, "attnzoo arena report"), _provenance(rows, db_path))
    if not rows:
        out.add(Para("This database holds no cells yet: run `attnzoo arena` to fill it.", "warn"))
    out.add(Heading(2, "Problems"), *_problems(rows))
    labels = [plots.label_for(key) for key in speed_series(rows)]
    labels += [plots.label_for(SeriesKey(g.method, g.variant, "", g.causal)) for g in fidelity_groups(rows)]
    # Imported here: report_swap reuses this module's cell formatters.
    from .report_swap import swap_labels, swap_section

    styles = plots.Styles([*labels, *swap_labels(rows)])
    _speed_section(rows, out, styles)
    _fidelity_section(rows, out, styles)
    out.add(*swap_section(rows, styles))
    return out.blocks


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        # mkstemp creates the file private (0600); a report is for reading, as any new file is.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_report(store_or_path: Store | str | os.PathLike, out_dir: str | os.PathLike) -> ReportPaths:
    """Write ``report.md``, ``report.html`` and the PNG plots of a results database into ``out_dir``.

    Args:
        store_or_path: an open :class:`Store`, or the path of a database (opened read-only; a missing or
            foreign file raises :class:`~attnzoo.arena.store.StoreError`).
        out_dir: the folder to write into (created if missing).

    Returns:
        The :class:`ReportPaths` written. Each file goes to a temporary name first, then is renamed.
    """
    store = store_or_path if isinstance(store_or_path, Store) else Store(store_or_path, readonly=True)
    try:
        rows = list(store.rows())
    finally:
        if store is not store_or_path:
            store.close()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"out_dir: cannot create {out}: {error.strerror}") from None
    blocks = build_report(rows, store.path)
    images = []
    for image in _images(blocks):
        _atomic_write(out / image.filename, image.data)
        images.append(out / image.filename)
    _atomic_write(out / "report.md", to_markdown(blocks).encode())
    _atomic_write(out / "report.html", to_html(blocks).encode())
    return ReportPaths(out, out / "report.md", out / "report.html", tuple(images))


def _images(blocks: Sequence[Block]) -> list[Image]:
    found = []
    for block in blocks:
        if isinstance(block, Image):
            found.append(block)
        elif isinstance(block, Details):
            found.extend(_images(block.blocks))
    return found
