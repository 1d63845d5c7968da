"""Running sweeps: every cell once, failures recorded, nothing lost or recomputed after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import TINY_TASK_OPTIONS, tiny_spec

from largebatch.experiments import sweep as sweep_module
from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.sweep import SWEEP_FILE, load_saved_spec, prepare, run_sweep
from largebatch.experiments.sweep_config import SweepConfigError
from largebatch.tasks import get_task
from largebatch.train import loop as loop_module
from largebatch.train import plan_run

# results that legitimately differ between two runs of the same cell
TIMING_KEYS = {"wall_time", "recorded_at", "examples_per_second", "extra"}


def comparable(row: dict) -> dict:
    """A row without timings and without where its sweep lives."""
    kept = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    kept["config"] = {k: v for k, v in row["config"].items() if k != "out_dir"}
    return kept


def metrics_without_time(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name != "time"]
    return [[line.split(",")[i] for i in keep] for line in lines]


def forbid_training(monkeypatch):
    def fail(config, plan=None):
        raise AssertionError(f"cell {config.out_dir} was trained again")

    monkeypatch.setattr(sweep_module, "train", fail)


def test_every_cell_recorded_then_skipped(tmp_path, monkeypatch):
    sweep = prepare(tiny_spec(), tmp_path)
    statuses = run_sweep(sweep, progress=False)
    assert list(statuses) == [c.cell_id for c in sweep.cells]
    assert set(statuses.values()) == {"done"}
    rows = ResultsStore(tmp_path).rows()
    assert sorted(r["cell_id"] for r in rows) == sorted(statuses)
    for row in rows:
        assert (tmp_path / row["run_dir"] / "metrics.csv").exists()
        assert row["final_test_accuracy"] is not None and row["steps"] > 0
    assert load_saved_spec(tmp_path) == sweep.spec
    assert json.loads((tmp_path / SWEEP_FILE).read_text())["optimizers"] == ["sgd", "adamw"]

    forbid_training(monkeypatch)
    assert run_sweep(prepare(tiny_spec(), tmp_path), progress=False) == statuses


def test_a_cell_is_planned_once_and_trains_by_that_plan(tmp_path, monkeypatch):
    """``prepare`` plans each cell as it checks it; training follows that plan."""
    sweep = prepare(tiny_spec(batch_sizes=[16], optimizers=["sgd"]), tmp_path)
    (cell,) = sweep.cells
    task = get_task(cell.config.task, **cell.config.task_options)
    assert cell.plan == plan_run(cell.config, task)

    def plan_again(*args):
        raise AssertionError("the cell was planned again")

    monkeypatch.setattr(loop_module, "plan_run", plan_again)
    assert run_sweep(sweep, progress=False) == {cell.cell_id: "done"}


def test_failed_and_diverged_cells_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    spec = tiny_spec(
        optimizer={"sgd": {"lrs": [0.05, 1e5]}, "adamw": {"betas": [0.9, 1.5]}},
    )
    sweep = prepare(spec, tmp_path)
    statuses = run_sweep(sweep, progress=False)
    by_kind = {}
    for row in ResultsStore(tmp_path).rows():
        kind = (row["optimizer"], row["lr"])
        by_kind.setdefault(kind, set()).add(row["status"])
        if row["status"] == "failed":
            assert "Invalid beta parameter" in row["error"]
            assert "Traceback" in Path(row["error_log"]).read_text()  # the full traceback
        if row["status"] == "diverged":
            assert row["error"].startswith("non-finite loss by step")
    assert by_kind == {
        ("sgd", 0.05): {"done"},
        ("sgd", 1e5): {"diverged"},
        ("adamw", None): {"failed"},
    }
    assert len(statuses) == len(sweep.cells) == 6

    # a plain re-run skips all of them; retry_failed trains the failed ones again
    forbid_training(monkeypatch)
    run_sweep(sweep, progress=False)
    retried = []
    monkeypatch.setattr(
        sweep_module, "_train", lambda config, plan: retried.append(config.optimizer) or _failed()
    )
    run_sweep(sweep, retry_failed=True, progress=False)
    assert retried == ["adamw", "adamw"]


def _failed():
    from largebatch.train import RunResult

    return RunResult(status="failed", steps=0, examples=0, wall_time=0.0, error="again")


def test_result_written_but_not_recorded_is_recorded_without_training(tmp_path, monkeypatch):
    sweep = prepare(tiny_spec(batch_sizes=[64], optimizers=["sgd"]), tmp_path)
    run_sweep(sweep, progress=False)
    (row,) = ResultsStore(tmp_path).rows()
    (tmp_path / "results.sqlite").unlink()  # as if killed after result.json, before recording
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"results.sqlite{suffix}").unlink(missing_ok=True)
    forbid_training(monkeypatch)
    run_sweep(sweep, progress=False)
    (again,) = ResultsStore(tmp_path).rows()
    assert comparable(again) == comparable(row)


def test_cells_rejected_before_any_run(tmp_path):
    spec = tiny_spec(batch_sizes=[16, "full"], warmup_steps=20)
    with pytest.raises(SweepConfigError, match=r"^cell sgd-b360-s0: Invalid warm-up"):
        prepare(spec, tmp_path)
    assert not (tmp_path / "results.sqlite").exists()


KILL_SWEEP = f"""
task = "teacher-student"
batch_sizes = [16, 64]
optimizers = ["sgd", "adamw"]
epochs = 12
evals_per_run = 12
target = ["accuracy", 0.6]
[task_options]
{chr(10).join(f"{k} = {v}" for k, v in TINY_TASK_OPTIONS.items())}
"""


def test_sigkill_mid_sweep_then_rerun_equals_uninterrupted(tmp_path):
    """Kill every process of a 2-job sweep mid-run; the re-run completes it exactly."""
    from largebatch.experiments.sweep_config import load_sweep

    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(KILL_SWEEP)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run_sweep(prepare(load_sweep(sweep_file), reference_dir), progress=False)
    reference = {r["cell_id"]: r for r in ResultsStore(reference_dir).rows()}

    command = [sys.executable, "-m", "largebatch", "sweep", str(killed_dir), "--file", str(sweep_file),
               "--jobs", "2", "--no-report", "--no-progress"]  # fmt: skip
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    killed_while_running = False
    while time.monotonic() < deadline and process.poll() is None:
        recorded = (
            ResultsStore(killed_dir).statuses() if (killed_dir / "results.sqlite").exists() else {}
        )
        started = (
            [d for d in (killed_dir / "runs").glob("*") if (d / "checkpoints").exists()]
            if killed_dir.exists()
            else []
        )
        if recorded and any(
            d.name not in recorded and not (d / "result.json").exists() for d in started
        ):
            os.killpg(process.pid, signal.SIGKILL)
            killed_while_running = True
            break
        time.sleep(0.02)
    process.wait(30)
    assert killed_while_running, process.stderr.read().decode()[-2000:]
    before = {
        r["cell_id"]: (killed_dir / r["run_dir"] / "result.json").stat().st_mtime_ns
        for r in ResultsStore(killed_dir).rows()
    }
    assert 0 < len(before) < len(reference)

    run_sweep(prepare(load_sweep(sweep_file), killed_dir), progress=False)
    rows = ResultsStore(killed_dir).rows()
    assert sorted(r["cell_id"] for r in rows) == sorted(reference)  # every cell exactly once
    for row in rows:
        assert comparable(row) == comparable(reference[row["cell_id"]]), row["cell_id"]
        assert metrics_without_time(killed_dir / row["run_dir"]) == metrics_without_time(
            reference_dir / row["run_dir"]
        )
        if row["cell_id"] in before:  # recorded before the kill: not run again
            assert (killed_dir / row["run_dir"] / "result.json").stat().st_mtime_ns == before[
                row["cell_id"]
            ]


def test_data_parallel_cell_matches_single_process(tmp_path):
    """A cell with nproc=2 runs through torchrun (gloo) and trains like one process."""
    single = prepare(tiny_spec(batch_sizes=[32], optimizers=["sgd"], epochs=1), tmp_path / "one")
    double = prepare(
        tiny_spec(batch_sizes=[32], optimizers=["sgd"], epochs=1, nproc=2), tmp_path / "two"
    )
    run_sweep(single, progress=False)
    assert run_sweep(double, progress=False) == {double.cells[0].cell_id: "done"}
    (one,), (two,) = ResultsStore(tmp_path / "one").rows(), ResultsStore(tmp_path / "two").rows()
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["steps"] == one["steps"]
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-4)
