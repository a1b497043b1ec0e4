"""The swap suite's section of the arena report, and the Sparse Frontier direction read from it.

"The Sparse Frontier" finds that at equal density, content-selected sparse attention keeps a
model's perplexity closer to dense than fixed patterns do. :func:`direction` checks it on the
stored SmolLM2 cells: per budget and N, the geometric mean of the perplexity ratio (method over
dense) of the content-selected family against that of the fixed-pattern families, and a verdict
over all of them. Only cells with status ``ok`` count (a cell that fell back to SDPA in any call
does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import plots
from .analysis import number
from .render import Block, Cell, Heading, Image, Para, Table, Text
from .store import Row
from .swap import MINILM, SMOLLM2, SUITE

CONTENT_FAMILIES = ("content_sparse",)
FIXED_FAMILIES = ("local", "block_sparse")
REPRODUCED, NOT_REPRODUCED, MIXED, NOT_MEASURED = "reproduced", "not reproduced", "mixed", "not measured"


def group_of(family: str) -> str:
    """``"content-selected"``, ``"fixed pattern"`` or ``"other"`` for a registry family."""
    if family in CONTENT_FAMILIES:
        return "content-selected"
    return "fixed pattern" if family in FIXED_FAMILIES else "other"


def _geomean(values: Sequence[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Comparison:
    """One budget and N: each side's geometric-mean perplexity ratio, its methods and their mean
    density (None where a side has no ``ok`` cell)."""

    budget: float
    n: int
    content: float | None
    fixed: float | None
    content_methods: tuple[str, ...]
    fixed_methods: tuple[str, ...]
    content_density: float | None
    fixed_density: float | None

    @property
    def verdict(self) -> str | None:
        """``"content closer"``, ``"fixed closer"``, ``"tie"``, or None when a side is missing."""
        if self.content is None or self.fixed is None:
            return None
        if math.isclose(self.content, self.fixed, rel_tol=1e-9):
            return "tie"
        return "content closer" if self.content < self.fixed else "fixed closer"


@dataclass(frozen=True)
class Direction:
    """Every comparison (sorted by N, then budget, largest first) and the overall verdict:
    :data:`REPRODUCED` (content-selected closer in every comparison with both sides),
    :data:`NOT_REPRODUCED` (in none), :data:`MIXED`, or :data:`NOT_MEASURED` (no comparison)."""

    comparisons: tuple[Comparison, ...]
    verdict: str

    @property
    def decided(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.verdict is not None]


def _latest(rows: Sequence[Row]) -> list[Row]:
    """One row per configuration (the last stored)."""
    return list({row.cell.key: row for row in rows}.values())


def swap_rows(rows: Sequence[Row], model: str) -> list[Row]:
    """The stored swap cells of ``model`` (:data:`~.swap.MINILM` or :data:`~.swap.SMOLLM2`)."""
    return _latest([r for r in rows if r.cell.suite == SUITE and r.cell.shape.get("model") == model])


def direction(rows: Sequence[Row]) -> Direction:
    """The Sparse Frontier direction over the SmolLM2 cells of ``rows`` (any rows; others ignored)."""
    sides: dict[tuple[float, int], dict[str, list[Row]]] = {}
    for row in swap_rows(rows, SMOLLM2):
        budget, ratio = number(row.cell.params.get("budget")), number(row.values.get("ratio"))
        side = group_of(str(row.values.get("family", "")))
        if row.values.get("status") != "ok" or budget is None or ratio is None or ratio <= 0 or side == "other":
            continue
        sides.setdefault((budget, int(row.cell.shape["N"])), {}).setdefault(side, []).append(row)
    comparisons = []
    for (budget, n), found in sorted(sides.items(), key=lambda item: (item[0][1], -item[0][0])):
        content, fixed = found.get("content-selected", []), found.get("fixed pattern", [])

        def summary(members: list[Row]) -> tuple[float | None, tuple[str, ...], float | None]:
            ratios = [float(r.values["ratio"]) for r in members]
            densities = [d for r in members if (d := number(r.values.get("density"))) is not None]
            return _geomean(ratios), tuple(sorted(r.cell.method for r in members)), _mean(densities)

        (c_ratio, c_methods, c_density), (f_ratio, f_methods, f_density) = summary(content), summary(fixed)
        comparisons.append(Comparison(budget, n, c_ratio, f_ratio, c_methods, f_methods, c_density, f_density))
    decided = [c.verdict for c in comparisons if c.verdict is not None]
    if not decided:
        verdict = NOT_MEASURED
    elif all(v == "content closer" for v in decided):
        verdict = REPRODUCED
    elif not any(v == "content closer" for v in decided):
        verdict = NOT_REPRODUCED
    else:
        verdict = MIXED
    return Direction(tuple(comparisons), verdict)


def _f(value: object, spec: str) -> str:
    found = number(value)
    return "—" if found is None else f"{found:{spec}}"


def _density(values: dict) -> str:
    text = _f(values.get("density"), ".3f")
    return text + " (nominal)" if values.get("density_source") == "nominal" and text != "—" else text


def _status_cell(members: Sequence[Row]) -> Cell:
    from .report import _status

    cell = _status(str(r.values.get("status", "unknown")) for r in members)
    served = sum(int(number(r.values.get("fallback_calls")) or 0) for r in members)
    calls = sum(int(number(r.values.get("calls")) or 0) for r in members)
    return Text(f"{cell.text}; SDPA served {served}/{calls} calls", "warn") if served else cell


def _order(row: Row) -> tuple:
    budget = number(row.cell.params.get("budget"))
    return (row.cell.method != "dense", group_of(str(row.values.get("family", ""))), row.cell.method, -(budget or 2))


def _not_installed(members: Sequence[Row], title: str) -> Para | None:
    if members and all(r.values.get("status") == "not_installed" for r in members):
        return Para(f"{title} was not run: {members[0].values.get('message')}", "warn")
    return None


def _minilm(rows: Sequence[Row]) -> list[Block]:
    from .report import _budget

    members = swap_rows(rows, MINILM)
    if not members:
        return []
    blocks: list[Block] = [Heading(3, "MiniLM (all-MiniLM-L6-v2, bidirectional): embeddings and retrieval")]
    skipped = _not_installed(members, "MiniLM")
    if skipped:
        return [*blocks, skipped]
    for items in sorted({int(r.cell.shape["items"]) for r in members}):
        group = sorted((r for r in members if r.cell.shape["items"] == items), key=_order)
        ref = next((r.values for r in group if number(r.values.get("dense_accuracy")) is not None), {})
        blocks.append(
            Para(
                f"{items} labelled query/document pairs from {group[0].cell.shape.get('corpus')} (each text at most "
                f"{group[0].cell.shape.get('max_tokens')} tokens). Dense model (SDPA): top-1 accuracy "
                f"{_f(ref.get('dense_accuracy'), '.3f')}, MRR {_f(ref.get('dense_mrr'), '.3f')}; chance "
                f"{_f(ref.get('chance'), '.3f')}. Cosine: the embedding's cosine to the dense model's, mean over "
                "queries and documents."
            )
        )
        table_rows = tuple(
            (
                r.cell.method,
                str(r.values.get("family", "")),
                _budget(number(r.cell.params.get("budget"))),
                _density(r.values),
                _f(r.values.get("cosine"), ".4f"),
                _f(r.values.get("cosine_min"), ".4f"),
                _f(r.values.get("accuracy"), ".3f"),
                _f(r.values.get("mrr"), ".3f"),
                _status_cell([r]),
            )
            for r in group
        )
        headers = ("Method", "Family", "Budget", "Density", "Cosine", "Min cosine", "Top-1 acc.", "MRR", "Status")
        blocks.append(Table(headers, table_rows, range(3, 8)))
    return blocks


def _smollm2_table(members: Sequence[Row]) -> Table:
    from .report import _budget

    ns = sorted({int(r.cell.shape["N"]) for r in members})
    by_key: dict[tuple[str, float | None], dict[int, Row]] = {}
    for row in sorted(members, key=_order):
        by_key.setdefault((row.cell.method, number(row.cell.params.get("budget"))), {})[int(row.cell.shape["N"])] = row
    dense_ppl = {
        int(r.cell.shape["N"]): r.values["dense_perplexity"] for r in members if "dense_perplexity" in r.values
    }
    reference: tuple[Cell, ...] = (Text("SDPA (reference)", "muted"), "exact", "—")
    for n in ns:
        reference += (_f(dense_ppl.get(n), ".3f"), "1", "1", "1")
    table_rows = [(*reference, "")]
    for (method, budget), per_n in by_key.items():
        first = next(iter(per_n.values()))
        cells: tuple[Cell, ...] = (method, str(first.values.get("family", "")), _budget(budget))
        for n in ns:
            v = per_n[n].values if n in per_n else {}
            cells += (_f(v.get("perplexity"), ".3f"), _f(v.get("ratio"), ".3f"), _f(v.get("agreement"), ".3f"))
            cells += (_density(v),)
        table_rows.append((*cells, _status_cell(list(per_n.values()))))
    headers: tuple[str, ...] = ("Method", "Family", "Budget")
    for n in ns:
        headers += (f"N={n} PPL", f"N={n} ×dense", f"N={n} agree", f"N={n} density")
    return Table((*headers, "Status"), tuple(table_rows), range(3, len(headers)))


def _direction_blocks(found: Direction) -> list[Block]:
    from .report import _budget

    if not found.comparisons:
        return [Para("Sparse Frontier direction: not measured (no ok SmolLM2 cell of a sparse family).", "warn")]
    table_rows = tuple(
        (
            _budget(c.budget),
            str(c.n),
            _f(c.content, ".3f"),
            _f(c.fixed, ".3f"),
            _f(c.content_density, ".3f"),
            _f(c.fixed_density, ".3f"),
            ", ".join(c.content_methods) or "—",
            ", ".join(c.fixed_methods) or "—",
            Text(c.verdict, "good" if c.verdict == "content closer" else "warn") if c.verdict else "—",
        )
        for c in found.comparisons
    )
    headers = ("Budget", "N", "Content ×dense", "Fixed ×dense", "Content density", "Fixed density")
    headers += ("Content methods", "Fixed methods", "Closer to dense")
    wins = sum(c.verdict == "content closer" for c in found.decided)
    tone = {REPRODUCED: "good", NOT_REPRODUCED: "bad", MIXED: "warn"}.get(found.verdict, "warn")
    summary = (
        f"Sparse Frontier direction (content-selected keeps perplexity closer to dense than fixed patterns at "
        f"equal budget): {found.verdict.upper()} — content-selected was closer in {wins} of {len(found.decided)} "
        "(budget, N) comparisons."
    )
    return [
        Heading(3, "Sparse Frontier direction"),
        Para(
            "Per budget and N: the geometric mean over methods of the perplexity ratio (method / dense) of the "
            f"content-selected family ({', '.join(CONTENT_FAMILIES)}) and of the fixed-pattern families "
            f"({', '.join(FIXED_FAMILIES)}), with their mean measured density (share of the allowed pairs; "
            "nominal where a method records none). Equal budgets are equal nominal densities; the measured "
            "ones show how far each side actually kept to it. Only cells with status ok count."
        ),
        Table(headers, table_rows, range(1, 6)),
        Para(summary, tone),
    ]


def _plot(members: Sequence[Row], styles: plots.Styles) -> Image | None:
    curves: dict[int, dict[tuple[str, str], list[tuple[float, float]]]] = {}
    for row in members:
        density, ratio = number(row.values.get("density")), number(row.values.get("ratio"))
        if row.values.get("status") != "ok" or row.cell.method == "dense" or density is None or ratio is None:
            continue
        key = (row.cell.method, group_of(str(row.values.get("family", ""))))
        curves.setdefault(int(row.cell.shape["N"]), {}).setdefault(key, []).append((density, ratio))
    png = plots.swap_plot(curves, styles)
    alt = "SmolLM2 perplexity ratio to dense vs density, content-selected vs fixed patterns"
    return None if png is None else Image("swap_perplexity.png", alt, png)


def swap_section(rows: Sequence[Row], styles: plots.Styles) -> list[Block]:
    """The report's "Swap" section for ``rows`` (every row of a database; non-swap rows ignored)."""
    blocks: list[Block] = [Heading(2, "Swap: methods inside pretrained models")]
    if not any(r.cell.suite == SUITE for r in rows):
        return [*blocks, Para("No swap cells in this database: run `attnzoo arena --suite swap`.", "warn")]
    blocks.append(
        Para(
            "Training-free replacement: each method replaces every attention call of a pretrained model "
            "(through `attnzoo.integrations.transformers`) at a budget, the share of the allowed (query, key) "
            "pairs each call may attend. Density: the share each method actually computed, as it recorded "
            "it (weighted by each call's allowed pairs), else the nominal budget. A cell where SDPA served "
            "any call instead of the method is marked in its status and left out of the direction."
        )
    )
    blocks += _minilm(rows)
    members = swap_rows(rows, SMOLLM2)
    if members:
        blocks.append(Heading(3, "SmolLM2-135M (causal decoder): perplexity and agreement"))
        skipped = _not_installed(members, "SmolLM2")
        if skipped:
            return [*blocks, skipped]
        blocks.append(
            Para(
                f"One window of the first N tokens of {members[0].cell.shape.get('text')}, batch 1, teacher-forced. "
                "PPL: perplexity of the N − 1 next tokens; ×dense: its ratio to SDPA's on the same window; agree: "
                "top-1 agreement with dense (teacher-forced greedy), the share of positions where the method's "
                "argmax next token equals the dense model's."
            )
        )
        blocks.append(_smollm2_table(members))
        image = _plot(members, styles)
        if image is not None:
            blocks.append(image)
        blocks += _direction_blocks(direction(rows))
    return blocks


def swap_labels(rows: Sequence[Row]) -> list[str]:
    """The curve labels the swap plot uses (for the report's shared :class:`~.plots.Styles`)."""
    return sorted({r.cell.method for r in rows if r.cell.suite == SUITE and r.cell.method != "dense"})
