"""The arena report: analysis functions on known curves, and rendering (Markdown, self-contained
HTML, PNG plots) of a synthetic database holding both suites and every status. Numbers here are made
up: these tests check the rendering, not the measurements."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import matplotlib.image

from attnzoo.arena.analysis import (
    EfficiencyLength,
    efficiency_length,
    fidelity_groups,
    scaling_exponent,
    speed_series,
)
from attnzoo.arena.report import write_report
from attnzoo.arena.store import Cell, Store, StoreError

NS = (256, 512, 1024, 2048, 4096)


def _sdpa_time(n: int) -> float:
    return 1e-9 * n**2


def _speed_values(family: str, n: int, time_s: float, factor: float = 1.0, **extra: object) -> dict:
    sdpa = factor * _sdpa_time(n)
    return {
        "status": "ok",
        "family": family,
        "median_s": time_s,
        "min_s": time_s * 0.95,
        "q25_s": time_s * 0.97,
        "q75_s": time_s * 1.04,
        "reps": 7,
        "first_call_s": time_s * 3,
        "sdpa_median_s": sdpa,
        "ratio_vs_sdpa": time_s / sdpa,
        "peak_extra_mib": 0.01 * n,
        "sdpa_peak_extra_mib": 0.02 * n,
        "gflops": 10.0,
        "matmul_gflops": 50.0,
        "roofline": 0.2,
        "check_error": 3e-7,
        "keys": 256,
        **extra,
    }


def _fill(store: Store) -> None:
    for n in NS:
        for pass_, factor in (("fwd", 1.0), ("fwdbwd", 3.0)):
            for causal in (False, True):
                shape = {"B": 1, "H": 4, "N": n, "D": 64, "causal": causal, "pass": pass_}
                t_sdpa = factor * _sdpa_time(n)
                store.put(Cell("speed", "sdpa", "default", {}, shape), _speed_values("exact", n, t_sdpa, factor))
                store.put(
                    Cell("speed", "sliding_window", "block_sparse", {"keys": 256}, shape),
                    _speed_values("local", n, factor * 1e-6 * n, factor),
                )
                linear = _speed_values("linear", n, factor * 2e-6 * n, factor)
                store.put(Cell("speed", "linear", "chunked", {}, shape), linear)
                peer = _speed_values("peer", n, factor * 1.5e-6 * n, factor, matches="sliding_window", settings="w 256")
                store.put(Cell("speed", "peer:local-attention", "default", {"keys": 256}, shape), peer)
        shape = {"B": 1, "H": 4, "N": n, "D": 64, "causal": False, "pass": "fwd"}
        store.put(
            Cell("speed", "moba", "gather", {"keys": 256}, shape),
            {"status": "wrong", "family": "content_sparse", "check_error": 0.31, "message": "differs by 0.31"},
        )
    shape = {"B": 1, "H": 4, "N": 256, "D": 64, "causal": False, "pass": "fwd"}
    store.put(
        Cell("speed", "cosformer", "default", {}, shape),
        {"status": "error", "family": "linear", "message": "RuntimeError: boom in cosformer"},
    )
    store.put(
        Cell("speed", "peer:performer-pytorch", "default", {}, shape),
        {
            "status": "not_installed",
            "family": "peer",
            "matches": "performer",
            "message": "not installed (pip install performer-pytorch)",
        },
    )
    store.put(Cell("speed", "neighborhood", "default", {}, shape), {"status": "unsupported", "message": "1-D only"})
    # A row with almost nothing in it: unknown values must never crash the report.
    store.put(Cell("speed", "strided", "default", {}, {"N": 512}), {"status": "ok"})

    for source, layers in (("minilm", (0, 1, 2)), ("synthetic:randn", (None,))):
        for layer in layers:
            shape = {"source": source, "layer": layer, "B": 1, "H": 12, "N": 256, "D": 32, "causal": False}
            for budget in (0.5, 0.25, 0.125):
                error = budget * 0.1 * (1 + (layer or 0))
                store.put(
                    Cell("fidelity", "sliding_window", "block_sparse", {"budget": budget}, shape),
                    {
                        "status": "ok",
                        "family": "local",
                        "budget": budget,
                        "density": budget * 1.02,
                        "rel_error": error,
                        "cosine": 1 - error / 2,
                        "rel_error_per_head": [error] * 12,
                        "recall": 1 - error,
                        "leak": None,
                    },
                )
            store.put(
                Cell("fidelity", "linear", "chunked", {}, shape),
                {"status": "ok", "family": "linear", "budget": None, "density": None, "rel_error": 0.8, "cosine": 0.6},
            )
            store.put(
                Cell("fidelity", "xattention", "default", {"budget": 0.25}, shape),
                {"status": "error", "family": "content_sparse", "message": "ValueError: xattention exploded"},
            )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("arena")
    with Store(folder / "arena.db") as store:
        _fill(store)
    return write_report(folder / "arena.db", folder / "out")


def test_efficiency_length_of_known_curves() -> None:
    # 1e-9 N² (baseline) meets 1e-6 N (method) at N = 1000, inside the measured range.
    found = efficiency_length(NS, [1e-6 * n for n in NS], [_sdpa_time(n) for n in NS])
    assert isinstance(found, EfficiencyLength)
    assert found.length == pytest.approx(1000, rel=1e-6)
    assert not found.extrapolated
    # Measured only below 1000: the same crossover, now extrapolated.
    small = (64, 128, 256, 512)
    found = efficiency_length(small, [1e-6 * n for n in small], [_sdpa_time(n) for n in small])
    assert found is not None and found.extrapolated and found.length == pytest.approx(1000, rel=1e-6)


def test_efficiency_length_drops_the_smallest_point_and_refuses_what_it_cannot_fit() -> None:
    # An outlier at the smallest N is dropped from the method's fit (>= 4 points), as in CAB.
    method = [1.0] + [1e-6 * n for n in NS[1:]]
    found = efficiency_length(NS, method, [_sdpa_time(n) for n in NS])
    assert found is not None and found.length == pytest.approx(1000, rel=1e-6)
    # A slower line never crosses a linear baseline; a crossing beyond the sane range is not reported.
    assert efficiency_length(NS, [2e-6 * n for n in NS], [1e-6 * n for n in NS]) is None
    assert efficiency_length(NS, [1.0 * n for n in NS], [_sdpa_time(n) for n in NS]) is None
    # Too few usable points (None and NaN are skipped).
    assert efficiency_length(NS[:2], [1e-6, 2e-6], [1e-3, 4e-3]) is None
    assert efficiency_length(NS[:3], [1e-6, None, math.nan], [1.0, 2.0, 3.0]) is None
    # Faster from the start: length 0, below the measured range.
    zero = efficiency_length(NS, [1e-9 * n for n in NS], [1e-3 + _sdpa_time(n) for n in NS])
    assert zero == EfficiencyLength(0.0, True)
    with pytest.raises(ValueError, match="method_times"):
        efficiency_length(NS, [1.0], [1.0] * len(NS))


def test_scaling_exponent_of_known_curves() -> None:
    assert scaling_exponent(NS, [3e-9 * n**2 for n in NS]) == pytest.approx(2.0, abs=1e-6)
    assert scaling_exponent(NS, [5e-6 * n for n in NS]) == pytest.approx(1.0, abs=1e-6)
    assert scaling_exponent(NS[:1], [1.0]) is None
    assert scaling_exponent(NS[:2], [1.0, None]) is None
    with pytest.raises(ValueError, match="times"):
        scaling_exponent(NS, [1.0])


def test_speed_series_and_fidelity_groups(tmp_path: Path) -> None:
    with Store(tmp_path / "a.db") as store:
        _fill(store)
        rows = list(store.rows())
    series = speed_series(rows)
    keys = {(k.method, k.pass_, k.causal) for k in series}
    assert ("sliding_window", "fwd", True) in keys and ("peer:local-attention", "fwdbwd", False) in keys
    assert all(k.method != "moba" for k in series), "wrong cells are not series"
    window = next(s for k, s in series.items() if k.method == "sliding_window" and k.pass_ == "fwd")
    assert window.ns == list(NS) and window.family == "local"
    assert window.efficiency_length().length == pytest.approx(1000, rel=1e-6)
    peer = next(s for k, s in series.items() if k.method == "peer:local-attention")
    assert peer.family == "local", "a peer is drawn with the family of the method it matches"
    minilm = [g for g in fidelity_groups(rows) if g.source == "minilm" and g.method == "sliding_window"]
    eighth = next(g for g in minilm if g.budget == 0.125)
    assert eighth.metrics["rel_error"] == pytest.approx(0.0125 * 2)  # mean of layers 0, 1, 2
    assert sorted(eighth.per_layer) == [0, 1, 2]


def test_report_files_and_plots(report) -> None:
    assert report.markdown.is_file() and report.html.is_file()
    names = {p.name for p in report.images}
    assert {"time_local.png", "time_linear.png", "memory.png", "fidelity.png"} == names
    for path in report.images:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0.01, f"{path.name} is blank"
    assert not [p for p in report.out_dir.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


def test_markdown_content(report) -> None:
    text = report.markdown.read_text()
    assert "Time relative to SDPA: forward" in text and "Time relative to SDPA: forward + backward" in text
    assert "| Method | Family | Backend | Mode | N=256 |" in text
    assert "**WRONG**" in text and "differs by 0.31" in text and "moba" in text
    assert "**ERROR**" in text and "boom in cosformer" in text
    assert "performer-pytorch" in text and "pip install performer-pytorch" in text
    window_row = next(line for line in text.splitlines() if line.startswith("| sliding_window | local"))
    assert "1,000" in window_row and "| 0.98× |" in window_row  # efficiency length; 1e-6 N / 1e-9 N² at N=1024
    assert "Source: minilm" in text and "Source: synthetic:randn" in text and "layer 2" in text
    assert "| sliding_window | local | block_sparse | non-causal | 1/8 |" in text
    for image in ("time_local.png", "memory.png", "fidelity.png"):
        assert f"({image})" in text
    assert "Machine" in text and "Git commit" in text and "Cells" in text


def test_html_is_self_contained(report) -> None:
    text = report.html.read_text()
    assert "http://" not in text and "https://" not in text and 'src="file' not in text
    assert "<link" not in text and "@import" not in text
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == len(report.images) > 0
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "imagesLoaded" in text and "WRONG" in text and "performer-pytorch" in text


def test_empty_and_missing_databases(tmp_path: Path) -> None:
    Store(tmp_path / "empty.db").close()
    paths = write_report(tmp_path / "empty.db", tmp_path / "out")
    text = paths.markdown.read_text()
    assert "holds no cells" in text and "No speed cells" in text and "No fidelity cells" in text
    assert paths.images == () and "<img" not in paths.html.read_text()
    with pytest.raises(StoreError, match="no arena database"):
        write_report(tmp_path / "missing.db", tmp_path / "out2")


def _chromium(*args: str, home: Path) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium")
    assert chromium is not None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    return subprocess.run(
        [chromium, *flags, *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )


def test_html_renders_in_headless_chromium(report, tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    url = report.html.resolve().as_uri()
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", url, home=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stdout[:2000]
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    assert loaded is not None, f"the page's script did not run: {body.group(0)}"
    assert int(loaded.group(1)) == len(report.images) > 0

    shot = tmp_path / "shot.png"
    result = _chromium("--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={shot}", url, home=tmp_path)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.02, "the screenshot is blank"


def test_efficiency_length_reads_a_measured_crossing() -> None:
    # Measured ratios of a method that is not linear in N (delta's training step, full run):
    # the crossing lies between 4096 and 8192, where the ratio passes 1, whatever a line fit says.
    ns = (512, 1024, 2048, 4096, 8192)
    ratios = (1.58, 1.65, 1.26, 1.12, 0.96)
    found = efficiency_length(ns, [r * _sdpa_time(n) for r, n in zip(ratios, ns)], [_sdpa_time(n) for n in ns])
    assert found is not None and not found.extrapolated
    expected = math.exp(math.log(4096) + math.log(1.12) / (math.log(1.12) - math.log(0.96)) * math.log(2))
    assert found.length == pytest.approx(expected, rel=1e-9)
    assert 4096 < found.length < 8192
