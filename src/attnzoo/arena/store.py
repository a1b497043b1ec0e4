"""The arena's results store: one SQLite database, one row per measured cell.

A cell is identified by its configuration (suite, method, variant, parameters, shape, dtype,
threads): :meth:`Store.has` lets a resumed run skip it. Each row also records where and with
what it was measured (machine, attnzoo and torch versions, git commit, timestamp) and its values
as JSON. Every cell is committed on its own, so a killed run loses at most the cell in flight.
The schema is versioned; a database written by a newer attnzoo is refused, never rewritten.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from .timing import cpu_model

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    suite TEXT NOT NULL,
    method TEXT NOT NULL,
    variant TEXT NOT NULL,
    params TEXT NOT NULL,
    shape TEXT NOT NULL,
    dtype TEXT NOT NULL,
    threads INTEGER NOT NULL,
    machine TEXT NOT NULL,
    attnzoo_version TEXT NOT NULL,
    torch_version TEXT NOT NULL,
    git_commit TEXT NOT NULL,
    timestamp REAL NOT NULL,
    "values" TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_suite ON cells (suite, method);
"""


class StoreError(Exception):
    """A database the arena cannot use (unwritable, not an arena database, a newer schema)."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Cell:
    """One measurement's configuration. ``shape`` holds the sizes and the mode (``B``, ``H``,
    ``N``, ``D``, ``causal``, ...); ``params`` the method's parameters (JSON-able values only)."""

    suite: str
    method: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict)
    shape: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    threads: int = 1

    @property
    def key(self) -> str:
        return _canonical([self.suite, self.method, self.variant, self.params, self.shape, self.dtype, self.threads])

    def label(self) -> str:
        sizes = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.suite}:{self.method}[{self.variant}]({sizes})"


@dataclass(frozen=True)
class Row:
    """A stored cell with its values and provenance."""

    cell: Cell
    values: dict[str, Any]
    machine: str
    attnzoo_version: str
    torch_version: str
    git_commit: str
    timestamp: float


def machine_name() -> str:
    """CPU model and core count, e.g. ``"Intel Xeon ... (2 CPUs)"``."""
    return f"{cpu_model()} ({os.cpu_count()} CPUs)"


def git_commit() -> str:
    """The commit of the attnzoo checkout this runs from (``"unknown"`` for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class Store:
    """An arena database. ``Store(path)`` creates it (and its folder) if missing.

    Raises :class:`StoreError` when the path cannot be written, is not an arena database, or
    was written by a newer schema.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"db: no arena database at {self.path}")
            self._conn = self._connect(f"file:{self.path}?mode=ro", uri=True)
            self._check_schema(create=False)
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoreError(f"db: cannot create the folder of {self.path}: {error.strerror}") from None
            if self.path.exists() and not os.access(self.path, os.W_OK):
                raise StoreError(f"db: {self.path} is not writable")
            self._conn = self._connect(str(self.path))
            self._check_schema(create=True)
        self._provenance = None

    def _connect(self, target: str, uri: bool = False) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(target, uri=uri, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL" if not uri else "PRAGMA query_only=1")
            return conn
        except sqlite3.Error as error:
            raise StoreError(f"db: cannot open {self.path} as an SQLite database: {error}") from None

    def _check_schema(self, create: bool) -> None:
        try:
            tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as error:
            raise StoreError(f"db: {self.path} is not an SQLite database ({error})") from None
        if "meta" in tables:
            row = self._conn.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"db: {self.path} has schema version {version}, newer than this attnzoo's {SCHEMA_VERSION}; "
                    "upgrade attnzoo or use another --db"
                )
            if version < 1:
                raise StoreError(f"db: {self.path} has no arena schema version; use another --db")
        elif tables:
            raise StoreError(f"db: {self.path} is an SQLite database but not an arena one (tables {sorted(tables)})")
        elif not create:
            raise StoreError(f"db: {self.path} is empty, not an arena database")
        else:
            try:
                with self._conn:
                    self._conn.executescript(_SCHEMA)
                    self._conn.execute(
                        "INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
            except sqlite3.OperationalError as error:
                raise StoreError(f"db: cannot write {self.path}: {error}") from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, cell: Cell) -> bool:
        return self._conn.execute("SELECT 1 FROM cells WHERE key=?", (cell.key,)).fetchone() is not None

    def put(self, cell: Cell, values: dict[str, Any]) -> None:
        """Store ``cell`` with ``values`` (replacing an earlier row of the same configuration),
        committed at once."""
        if self._provenance is None:
            self._provenance = (machine_name(), __version__, torch.__version__, git_commit())
        machine, version, torch_version, commit = self._provenance
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO cells (key, suite, method, variant, params, shape, dtype, threads, machine, "
                'attnzoo_version, torch_version, git_commit, timestamp, "values") '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cell.key,
                    cell.suite,
                    cell.method,
                    cell.variant,
                    _canonical(cell.params),
                    _canonical(cell.shape),
                    cell.dtype,
                    cell.threads,
                    machine,
                    version,
                    torch_version,
                    commit,
                    time.time(),
                    json.dumps(values, default=float, allow_nan=True),
                ),
            )

    def rows(self, suite: str | None = None) -> Iterator[Row]:
        """Every stored row (optionally of one suite), in the order they were measured."""
        query = (
            "SELECT suite, method, variant, params, shape, dtype, threads, machine, attnzoo_version, "
            'torch_version, git_commit, timestamp, "values" FROM cells'
        )
        args: tuple = ()
        if suite is not None:
            query += " WHERE suite=?"
            args = (suite,)
        for r in self._conn.execute(query + " ORDER BY id", args):
            cell = Cell(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), r[5], r[6])
            yield Row(cell, json.loads(r[12]), r[7], r[8], r[9], r[10], r[11])

    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
