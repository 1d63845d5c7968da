"""The results database: round trip, extensible metrics, concurrent writers, bad files."""

from __future__ import annotations

import multiprocessing
import sqlite3
from dataclasses import fields

import pytest

from largebatch.experiments.results_store import (
    RESULT_COLUMNS,
    ResultsStore,
    ResultsStoreError,
    select_rows,
)
from largebatch.train.config import RunConfig, RunResult


def make_result(i: int, status: str = "done") -> RunResult:
    return RunResult(
        status=status, steps=10 * i, examples=640 * i, wall_time=0.5 * i,
        final_test_accuracy=i / 100, best_test_accuracy=i / 90, steps_to_target=i,
        error="boom" if status == "failed" else None,
        extra={"total_steps": 10 * i, "final": {"train": {"loss": 0.1}}, "note": "text"},
    )  # fmt: skip


def test_round_trip_every_field(tmp_path):
    store = ResultsStore(tmp_path)
    config = RunConfig(
        optimizer="adamw", batch_size=256, lr=3e-3, seed=2, epochs=5, target=("accuracy", 0.9)
    )
    result = make_result(7, "failed")
    store.record_run("cell-a", config, result, run_dir="runs/cell-a")
    (row,) = store.rows()
    for f in fields(RunResult):
        if f.name != "extra":
            assert row[f.name] == getattr(result, f.name), f.name
    assert row["extra"] == {"total_steps": 70, "final": {"train": {"loss": 0.1}}, "note": "text"}
    assert RunConfig.from_dict(row["config"]) == config
    assert (row["optimizer"], row["batch_size"], row["lr"], row["seed"]) == ("adamw", 256, 3e-3, 2)
    assert row["run_dir"] == "runs/cell-a"
    assert row["total_steps"] == 70  # numeric extra values become metric columns
    assert store.statuses() == {"cell-a": "failed"}


def test_metrics_extend_rows_without_schema_changes(tmp_path):
    store = ResultsStore(tmp_path)
    store.record_run("a", RunConfig(), make_result(1))
    store.record_run("b", RunConfig(seed=1), make_result(2))
    store.record_metrics("a", {"sharpness": 12.5, "top_eigenvalue": 3.0})
    store.record_metrics("a", {"sharpness": 13.0})  # overwrite
    rows = {r["cell_id"]: r for r in store.rows()}
    assert rows["a"]["sharpness"] == 13.0 and rows["a"]["top_eigenvalue"] == 3.0
    assert "sharpness" not in rows["b"]
    assert store.metric_names() == ["sharpness", "top_eigenvalue", "total_steps"]
    with pytest.raises(KeyError, match="'missing'"):
        store.record_metrics("missing", {"sharpness": 1.0})
    with pytest.raises(ValueError, match="clash"):
        store.record_metrics("a", {"steps": 1.0})
    with pytest.raises(ValueError, match="not numeric"):
        store.record_metrics("a", {"label": "sharp"})
    # re-recording a run replaces its row and its metrics
    store.record_run("a", RunConfig(), make_result(3))
    rows = {r["cell_id"]: r for r in store.rows()}
    assert rows["a"]["steps"] == 30 and "sharpness" not in rows["a"]


def _writer(path: str, prefix: str, count: int, barrier) -> None:
    store = ResultsStore(path, timeout=60)
    barrier.wait()
    for i in range(count):
        store.record_run(f"{prefix}-{i}", RunConfig(seed=i), make_result(i + 1))
        store.record_run("shared", RunConfig(), make_result(1))
        store.record_metrics(f"{prefix}-{i}", {"writer": float(prefix == "q")})


def test_two_processes_writing_at_once(tmp_path):
    ResultsStore(tmp_path)  # create the schema first, as a sweep does
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    count = 40
    workers = [
        context.Process(target=_writer, args=(str(tmp_path), prefix, count, barrier))
        for prefix in ("p", "q")
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    rows = {r["cell_id"]: r for r in ResultsStore(tmp_path).rows()}
    assert len(rows) == 2 * count + 1
    for prefix in ("p", "q"):
        for i in range(count):
            row = rows[f"{prefix}-{i}"]
            assert row["seed"] == i and row["steps"] == 10 * (i + 1)
            assert row["writer"] == float(prefix == "q")
    con = sqlite3.connect(tmp_path / "results.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_locked_database_is_a_clear_error_and_writes_nothing(tmp_path):
    store = ResultsStore(tmp_path, timeout=0.2)
    store.record_run("before", RunConfig(), make_result(1))
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(
            ResultsStoreError, match="locked by another process.*nothing was written"
        ):
            store.record_run("during", RunConfig(), make_result(2))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert set(store.statuses()) == {"before"}


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_database_is_a_clear_error_and_left_untouched(tmp_path, damage):
    path = tmp_path / "results.sqlite"
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        store = ResultsStore(tmp_path)
        for i in range(60):
            store.record_run(f"cell-{i}", RunConfig(seed=i), make_result(i + 1))
        con = sqlite3.connect(path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    before = path.read_bytes()
    with pytest.raises(ResultsStoreError, match="corrupt|malformed"):
        ResultsStore(tmp_path).record_run("new", RunConfig(), make_result(1))
    assert path.read_bytes() == before


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE something_else (x)")
    con.commit()
    con.close()
    with pytest.raises(ResultsStoreError, match="not a largebatch results database"):
        ResultsStore(tmp_path)
    con = sqlite3.connect(path)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["something_else"]


def test_missing_result_columns_are_added(tmp_path):
    """A database written before a RunResult field existed gains its column."""
    store = ResultsStore(tmp_path)
    store.record_run("old", RunConfig(), make_result(1))
    con = sqlite3.connect(store.path)
    con.execute("ALTER TABLE runs DROP COLUMN best_val_accuracy")
    con.commit()
    con.close()
    store = ResultsStore(tmp_path)
    con = sqlite3.connect(store.path)
    assert {r[1] for r in con.execute("PRAGMA table_info(runs)")} >= set(RESULT_COLUMNS)
    assert store.rows()[0]["steps"] == 10


def test_select_rows_filters_and_sorts(tmp_path):
    store = ResultsStore(tmp_path)
    for i, optimizer in enumerate(["sgd", "adamw", "sgd"]):
        store.record_run(
            f"c{i}", RunConfig(optimizer=optimizer, epochs=i + 1.0), make_result(i + 1)
        )
    store.record_metrics("c2", {"sharpness": 5.0})
    rows = store.rows()
    assert [r["cell_id"] for r in select_rows(rows, {"optimizer": "sgd"})] == ["c0", "c2"]
    assert [r["cell_id"] for r in select_rows(rows, {"epochs": 2})] == ["c1"]  # a config field
    assert [r["cell_id"] for r in select_rows(rows, sort="-final_test_accuracy")] == [
        "c2",
        "c1",
        "c0",
    ]
    assert [r["cell_id"] for r in select_rows(rows, sort="sharpness")] == ["c2", "c0", "c1"]
    with pytest.raises(KeyError, match="Unknown column 'nope'"):
        select_rows(rows, {"nope": 1})


def test_missing_database_is_reported_when_not_creating(tmp_path):
    with pytest.raises(ResultsStoreError, match="No results database"):
        ResultsStore(tmp_path / "nowhere", create=False)
