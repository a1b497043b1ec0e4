"""``attnzoo compare OLD.db NEW.db``: what changed between two arena runs.

Cells are matched by configuration. Speed is compared as the time relative to SDPA measured in
the same cell (``ratio_vs_sdpa``), which cancels most of the difference between machines and
between a loaded and a quiet host; the raw medians are shown beside it. A cell that was ``ok``
and is now ``wrong`` or ``error`` is a regression, and so, with ``--fail-if-slower PCT``, is a
ratio that grew by more than PCT percent. Fidelity errors that grew are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .store import Row, Store

BROKEN = ("wrong", "error")


@dataclass(frozen=True)
class Change:
    label: str
    kind: str  # "slower", "faster", "broken", "fixed", "fidelity"
    old: float | str
    new: float | str
    percent: float | None
    regression: bool


@dataclass(frozen=True)
class Comparison:
    matched: int
    only_old: int
    only_new: int
    changes: list[Change]

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]


def _rows(path: Path) -> dict[str, Row]:
    with Store(path, readonly=True) as store:
        return {row.cell.key: row for row in store.rows()}


def compare(old_path: Path, new_path: Path, fail_if_slower: float | None = None, noise: float = 5.0) -> Comparison:
    """Compare two databases; speed changes under ``noise`` percent are not listed."""
    old, new = _rows(old_path), _rows(new_path)
    changes: list[Change] = []
    shared = [k for k in new if k in old]
    for key in shared:
        a, b = old[key], new[key]
        label = b.cell.label()
        sa, sb = a.values.get("status"), b.values.get("status")
        if sa == "ok" and sb in BROKEN:
            changes.append(Change(label, "broken", sa, f"{sb}: {b.values.get('message', '')}", None, True))
            continue
        if sa in BROKEN and sb == "ok":
            changes.append(Change(label, "fixed", str(sa), "ok", None, False))
            continue
        if sa != "ok" or sb != "ok":
            continue
        if b.cell.suite == "speed" and b.cell.method != "sdpa":
            ra, rb = a.values.get("ratio_vs_sdpa"), b.values.get("ratio_vs_sdpa")
            if not ra or not rb:
                continue
            percent = (rb / ra - 1) * 100
            if abs(percent) < noise:
                continue
            regression = fail_if_slower is not None and percent > fail_if_slower
            changes.append(Change(label, "slower" if percent > 0 else "faster", ra, rb, percent, regression))
        elif b.cell.suite == "fidelity":
            ea, eb = a.values.get("rel_error"), b.values.get("rel_error")
            if ea is None or eb is None or eb <= ea * 1.01 + 1e-9:
                continue
            changes.append(Change(label, "fidelity", ea, eb, (eb / ea - 1) * 100 if ea else None, False))
    return Comparison(len(shared), len(set(old) - set(new)), len(set(new) - set(old)), changes)


def format_comparison(result: Comparison, old_path: Path, new_path: Path) -> str:
    lines = [
        f"compare {old_path} -> {new_path}: {result.matched} cells in both, "
        f"{result.only_old} only in the old, {result.only_new} only in the new",
    ]
    if not result.changes:
        lines.append("no changes beyond the noise threshold")
    order = {"broken": 0, "slower": 1, "fidelity": 2, "fixed": 3, "faster": 4}
    for c in sorted(result.changes, key=lambda c: (order[c.kind], -(abs(c.percent or 0)))):
        flag = "REGRESSION " if c.regression else ""
        if c.kind in ("slower", "faster"):
            detail = f"time/SDPA {c.old:.3f} -> {c.new:.3f} ({c.percent:+.1f}%)"
        elif c.kind == "fidelity":
            detail = f"relative error {c.old:.4g} -> {c.new:.4g}"
        else:
            detail = f"{c.old} -> {c.new}"
        lines.append(f"  {flag}{c.kind}: {c.label}: {detail}")
    lines.append(f"{len(result.regressions)} regression(s)")
    return "\n".join(lines)
