"""The arena's SQLite store: one row per cell, resumable, versioned, refusing what it cannot use."""

from __future__ import annotations

import math
import sqlite3

import pytest

from attnzoo.arena.store import SCHEMA_VERSION, Cell, Store, StoreError


def _cell(n: int = 64, method: str = "dense") -> Cell:
    return Cell("speed", method, "sdpa", {"keys": None}, {"B": 1, "H": 2, "N": n, "D": 8, "causal": True}, threads=1)


def test_put_has_rows_round_trip(tmp_path):
    path = tmp_path / "sub" / "arena.db"
    with Store(path) as store:
        assert not store.has(_cell())
        store.put(_cell(), {"status": "ok", "median_s": 0.5, "nan": float("nan")})
        assert store.has(_cell()) and not store.has(_cell(128))
    with Store(path, readonly=True) as store:
        (row,) = list(store.rows())
    assert row.cell == _cell()
    assert row.values["median_s"] == 0.5 and math.isnan(row.values["nan"])
    assert row.torch_version and row.attnzoo_version and row.machine and row.git_commit and row.timestamp > 0


def test_key_ignores_dict_order_and_replaces_not_duplicates(tmp_path):
    a = Cell("speed", "dense", "sdpa", {"a": 1, "b": 2}, {"N": 4, "B": 1})
    b = Cell("speed", "dense", "sdpa", {"b": 2, "a": 1}, {"B": 1, "N": 4})
    assert a.key == b.key
    with Store(tmp_path / "x.db") as store:
        store.put(a, {"v": 1})
        store.put(b, {"v": 2})
        assert store.count() == 1
        assert next(store.rows()).values == {"v": 2}


def test_rows_filtered_by_suite(tmp_path):
    with Store(tmp_path / "x.db") as store:
        store.put(_cell(), {})
        store.put(Cell("fidelity", "dense", "default", {}, {"N": 4}), {})
        assert [r.cell.suite for r in store.rows("fidelity")] == ["fidelity"]


def test_newer_schema_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value=? WHERE name='schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="newer than this attnzoo"):
        Store(path)
    with pytest.raises(StoreError, match="newer"):
        Store(path, readonly=True)


def test_foreign_sqlite_and_garbage_refused(tmp_path):
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not an arena"):
        Store(foreign)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="as an SQLite database: file is not a database"):
        Store(garbage)


def test_missing_readonly_and_unwritable(tmp_path):
    with pytest.raises(StoreError, match="no arena database"):
        Store(tmp_path / "missing.db", readonly=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create the folder"):
        Store(blocker / "arena.db")
