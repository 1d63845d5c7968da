"""The results database of a sweep: one SQLite file, one row per run.

``DIR/results.sqlite`` indexes every finished run of a sweep: its full config
(JSON, plus key columns for querying), its status, and every
:class:`~largebatch.train.config.RunResult` field as a column. Per-run metric
curves stay in the run directories; ``run_dir`` points at them.

Extensible without editing this module: numeric values in ``RunResult.extra``
and anything passed to :meth:`ResultsStore.record_metrics` (sharpness, Hessian
eigenvalues, ...) land in the ``metrics`` table, one ``(cell_id, name, value)``
row each, and appear as columns in :meth:`ResultsStore.rows`. New
``RunResult`` fields become new columns automatically (``ALTER TABLE``).

Writes are ``BEGIN IMMEDIATE`` transactions on a WAL database with a busy
timeout, so several processes may record at once. A locked, corrupt or foreign
file raises :class:`ResultsStoreError` and is never modified or replaced.
"""

from __future__ import annotations

import datetime
import json
import math
import sqlite3
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from largebatch.train.config import RunConfig, RunResult
from largebatch.utils.errors import ConfigError, LargeBatchError, UnknownNameError

DB_NAME = "results.sqlite"
SCHEMA_VERSION = 1

#: RunConfig fields copied into their own columns (the full config is in ``config``).
CONFIG_COLUMNS = {
    "task": "TEXT",
    "optimizer": "TEXT",
    "batch_size": "INTEGER",
    "lr": "REAL",
    "seed": "INTEGER",
}
_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT"}


class ResultsStoreError(LargeBatchError, RuntimeError):
    """The results database cannot be used (locked, corrupt, not ours)."""


def _result_columns() -> dict[str, str]:
    """SQL column per scalar RunResult field, derived from its type hints."""
    hints = typing.get_type_hints(RunResult)
    columns = {}
    for f in fields(RunResult):
        if f.name == "extra":
            continue
        hint = hints[f.name]
        scalar = next(
            (t for t in (int, float, str) if t is hint or t in typing.get_args(hint)), str
        )
        columns[f.name] = _SQL_TYPES[scalar]
    return columns


RESULT_COLUMNS = _result_columns()
CORE_COLUMNS = {
    "cell_id",
    *CONFIG_COLUMNS,
    "config",
    *RESULT_COLUMNS,
    "extra",
    "run_dir",
    "recorded_at",
}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    cell_id TEXT PRIMARY KEY,
    {", ".join(f"{name} {sql}" for name, sql in CONFIG_COLUMNS.items())},
    config TEXT NOT NULL,
    {", ".join(f"{name} {sql}" for name, sql in RESULT_COLUMNS.items())},
    extra TEXT NOT NULL DEFAULT '{{}}',
    run_dir TEXT,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    cell_id TEXT NOT NULL REFERENCES runs(cell_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (cell_id, name)
);
"""


def _numeric_items(values: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """The entries of ``values`` that are real numbers (non-finite stored as NULL)."""
    items = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        items.append((name, float(value) if math.isfinite(value) else None))
    return items


class ResultsStore:
    """A sweep's ``results.sqlite``; safe to use from several processes at once.

    Args:
        path: the database file, or a sweep directory (then ``DIR/results.sqlite``).
        timeout: seconds to wait for another writer before giving up.
        create: create the file if it does not exist (else it must exist).
    """

    def __init__(self, path: str | Path, *, timeout: float = 60.0, create: bool = True) -> None:
        path = Path(path)
        self.path = path / DB_NAME if path.is_dir() or not path.suffix else path
        self.timeout = timeout
        if not self.path.exists():
            if not create:
                raise ResultsStoreError(f"No results database at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    # --- connection and error handling ------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA foreign_keys = ON")
        return con

    def _error(self, exc: sqlite3.Error) -> ResultsStoreError:
        """A clear message for what sqlite3 reports."""
        message = str(exc)
        if "locked" in message or "busy" in message:
            return ResultsStoreError(
                f"Results database {self.path} is locked by another process "
                f"(waited {self.timeout:g} s); nothing was written."
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return ResultsStoreError(
                f"Results database {self.path} is corrupt or not an SQLite file ({message}); "
                "it was left untouched. Move it away to start a new one."
            )
        return ResultsStoreError(f"Results database {self.path}: {message}")

    def _run(self, work: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        """Run ``work`` on a fresh connection, in one IMMEDIATE transaction if writing."""
        try:
            con = self._connect()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            if write:
                con.execute("BEGIN IMMEDIATE")
            value = work(con)
            if write:
                con.execute("COMMIT")
            return value
        except sqlite3.Error as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise self._error(exc) from exc
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def _open(self) -> None:
        """Check the file is an intact results database; create or upgrade its schema."""

        def inspect(con: sqlite3.Connection) -> tuple[set[str], int | None, set[str]]:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            version = None
            if "meta" in tables:
                row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else None
            columns = {r["name"] for r in con.execute("PRAGMA table_info(runs)")}
            return tables, version, columns

        tables, version, columns = self._run(inspect, write=False)
        if tables and version is None:
            raise ResultsStoreError(
                f"{self.path} is an SQLite database but not a largebatch results database "
                f"(tables: {', '.join(sorted(tables))}); it was left untouched."
            )
        if version is not None and version > SCHEMA_VERSION:
            raise ResultsStoreError(
                f"{self.path} has schema version {version}, newer than this largebatch "
                f"understands ({SCHEMA_VERSION}); upgrade largebatch."
            )
        if not tables:
            # WAL lets readers work while one process writes; it persists in the file.
            self._run(lambda con: con.execute("PRAGMA journal_mode=WAL"), write=False)
        if not tables or not set(RESULT_COLUMNS) <= columns:
            self._run(self._create_or_upgrade, write=True)

    @staticmethod
    def _create_or_upgrade(con: sqlite3.Connection) -> None:
        """Create missing tables, and a column for every RunResult field not yet stored."""
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                con.execute(statement)
        con.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        present = {r["name"] for r in con.execute("PRAGMA table_info(runs)")}
        for name, sql in RESULT_COLUMNS.items():
            if name not in present:
                con.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql}")

    # --- writing -------------------------------------------------------------------

    def record_run(
        self,
        cell_id: str,
        config: RunConfig,
        result: RunResult,
        run_dir: str | None = None,
    ) -> None:
        """Insert or replace the row of ``cell_id`` (and the numeric ``result.extra``)."""
        config_dict = config.to_dict()
        row = {
            "cell_id": cell_id,
            **{name: config_dict[name] for name in CONFIG_COLUMNS},
            "config": json.dumps(config_dict, sort_keys=True),
            **{name: getattr(result, name) for name in RESULT_COLUMNS},
            "extra": json.dumps(result.extra, sort_keys=True, default=str),
            "run_dir": run_dir,
            "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)

        def write(con: sqlite3.Connection) -> None:
            con.execute("DELETE FROM metrics WHERE cell_id = ?", (cell_id,))
            con.execute(
                f"INSERT OR REPLACE INTO runs ({names}) VALUES ({marks})", list(row.values())
            )
            self._insert_metrics(
                con, cell_id, [i for i in _numeric_items(result.extra) if i[0] not in CORE_COLUMNS]
            )

        self._run(write, write=True)

    def record_metrics(self, cell_id: str, values: Mapping[str, float]) -> None:
        """Add or overwrite named numeric metrics of a recorded run (e.g. ``sharpness``)."""
        items = _numeric_items(values)
        skipped = sorted(set(values) - {name for name, _ in items})
        if skipped:
            raise ConfigError(f"Metric values must be numbers; not numeric: {skipped}")
        clashing = sorted(set(values) & CORE_COLUMNS)
        if clashing:
            raise ConfigError(f"Metric names clash with core columns: {clashing}")

        def write(con: sqlite3.Connection) -> None:
            if con.execute("SELECT 1 FROM runs WHERE cell_id = ?", (cell_id,)).fetchone() is None:
                raise KeyError(f"No run {cell_id!r} in {self.path}")
            self._insert_metrics(con, cell_id, items)

        self._run(write, write=True)

    @staticmethod
    def _insert_metrics(
        con: sqlite3.Connection, cell_id: str, items: Iterable[tuple[str, float | None]]
    ) -> None:
        con.executemany(
            "INSERT OR REPLACE INTO metrics (cell_id, name, value) VALUES (?, ?, ?)",
            [(cell_id, name, value) for name, value in items],
        )

    # --- reading -------------------------------------------------------------------

    def statuses(self) -> dict[str, str]:
        """``cell_id -> status`` of every recorded run."""
        rows = self._run(
            lambda con: list(con.execute("SELECT cell_id, status FROM runs")), write=False
        )
        return {r["cell_id"]: r["status"] for r in rows}

    def rows(self) -> list[dict[str, Any]]:
        """Every run as a dict: columns, metrics by name, ``config`` and ``extra`` parsed."""

        def read(con: sqlite3.Connection) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
            runs = list(con.execute("SELECT * FROM runs ORDER BY cell_id"))
            metrics = list(con.execute("SELECT cell_id, name, value FROM metrics ORDER BY name"))
            return runs, metrics

        runs, metrics = self._run(read, write=False)
        by_id = {}
        for r in runs:
            row = dict(r)
            row["config"] = json.loads(row["config"])
            row["extra"] = json.loads(row["extra"])
            by_id[row["cell_id"]] = row
        for m in metrics:
            by_id[m["cell_id"]][m["name"]] = m["value"]
        return list(by_id.values())

    def metric_names(self) -> list[str]:
        """Names in the metrics table (columns beyond the core schema)."""
        rows = self._run(
            lambda con: list(con.execute("SELECT DISTINCT name FROM metrics ORDER BY name")),
            write=False,
        )
        return [r["name"] for r in rows]


# --- selecting rows (``largebatch results``) -----------------------------------------------


def row_value(row: Mapping[str, Any], key: str) -> Any:
    """A column, metric or config field of a row (``config.KEY`` forces the config field).

    ``None`` if the row has no such value (e.g. a metric recorded for other runs only).
    """
    if key.startswith("config."):
        return row["config"].get(key.removeprefix("config."))
    return row[key] if key in row else row["config"].get(key)


def _same(actual: Any, wanted: Any) -> bool:
    if isinstance(actual, int | float) and isinstance(wanted, int | float):
        return float(actual) == float(wanted)
    return str(actual) == str(wanted)


def select_rows(
    rows: Iterable[Mapping[str, Any]],
    filters: Mapping[str, Any] | None = None,
    sort: str | None = None,
    columns: Iterable[str] | None = None,
) -> list[Mapping[str, Any]]:
    """Rows matching every ``key == value`` filter, sorted by ``sort`` (``-key``: descending).

    Keys (of ``filters``, ``sort`` and the ``columns`` to be shown) are row
    columns, metric names or config fields (see :func:`row_value`); an unknown
    key raises ``UnknownNameError`` (a ``KeyError``) naming it. Missing values sort last.
    """
    rows = list(rows)
    known = set().union(*(set(r) | set(r["config"]) for r in rows)) - {"config", "extra"}
    keys = [*(filters or {}), *([sort.removeprefix("-")] if sort else []), *(columns or [])]
    for key in keys:
        if rows and key.removeprefix("config.") not in known:
            raise UnknownNameError(f"Unknown column {key!r}; known: {', '.join(sorted(known))}")
    for key, wanted in (filters or {}).items():
        rows = [r for r in rows if _same(row_value(r, key), wanted)]
    if sort:
        key = sort.removeprefix("-")
        present = [r for r in rows if row_value(r, key) is not None]
        missing = [r for r in rows if row_value(r, key) is None]
        present.sort(key=lambda r: row_value(r, key), reverse=sort.startswith("-"))
        rows = present + missing
    return rows
