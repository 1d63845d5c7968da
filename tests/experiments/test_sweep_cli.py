"""``largebatch sweep``, ``results`` and ``report`` from the command line."""

from __future__ import annotations

import csv
import io
import json

from click.testing import CliRunner
from sweep_helpers import TINY_TASK_OPTIONS

from largebatch.cli import main
from largebatch.experiments import sweep as sweep_module
from largebatch.experiments.results_store import ResultsStore


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_sweep_from_flags_then_continue_without_them(tmp_path, monkeypatch):
    directory = tmp_path / "study"
    task_options = [f"--task-opt={k}={v}" for k, v in TINY_TASK_OPTIONS.items()]
    result = invoke(
        "sweep", directory, "--task", "teacher-student", *task_options, "--batch-sizes", "16,full",
        "--optimizers", "sgd", "--epochs", "2", "--target", "accuracy=0.5", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Final test accuracy (%) by optimizer and batch size" in result.output
    assert (directory / "report.html").exists() and (directory / "report.md").exists()
    rows = ResultsStore(directory).rows()
    assert sorted(r["batch_size"] for r in rows) == [16, 360]

    # the saved sweep is the starting point: nothing to train, one more seed adds cells
    monkeypatch.setattr(
        sweep_module, "train", lambda config, plan: (_ for _ in ()).throw(AssertionError)
    )
    again = invoke("sweep", directory, "--no-progress", "--no-report")
    assert again.exit_code == 0 and "sgd" in again.output
    monkeypatch.undo()
    more = invoke("sweep", directory, "--seeds", "0,1", "--no-progress", "--no-report")
    assert more.exit_code == 0, more.output
    assert sorted((r["batch_size"], r["seed"]) for r in ResultsStore(directory).rows()) == [
        (16, 0), (16, 1), (360, 0), (360, 1)
    ]  # fmt: skip


def test_bad_sweep_file_stops_before_any_run(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('optimizers = ["sgd"]\nepochs = "ten"\n')
    result = CliRunner().invoke(main, ["sweep", str(tmp_path / "d"), "--file", str(path)])
    assert result.exit_code == 2
    assert f"{path}:2: epochs: expected a number > 0, got 'ten'" in result.output
    assert not (tmp_path / "d").exists()


def test_results_filter_sort_and_csv(synthetic_sweep, tmp_path):
    result = invoke("results", synthetic_sweep, "--filter", "optimizer=sgd", "--filter", "batch_size=64",
                    "--sort", "-final_test_accuracy", "--columns", "optimizer,batch_size,lr,seed,final_test_accuracy")  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["optimizer", "batch_size", "lr", "seed", "final_test_accuracy"]
    values = [float(line.split()[-1]) for line in lines[1:]]
    assert len(values) == 4 and values == sorted(values, reverse=True)

    out = tmp_path / "runs.csv"
    invoke("results", synthetic_sweep, "--filter", "status=diverged", "--csv", out)
    (row,) = list(csv.DictReader(io.StringIO(out.read_text())))
    assert row["status"] == "diverged" and json.loads(row["config"])["batch_size"] == 4096

    bad = CliRunner().invoke(main, ["results", str(synthetic_sweep), "--sort", "nope"])
    assert bad.exit_code == 2 and "Unknown column 'nope'" in bad.output
    bad = CliRunner().invoke(main, ["results", str(synthetic_sweep), "--columns", "lr,bogus"])
    assert bad.exit_code == 2 and "Unknown column 'bogus'" in bad.output


def test_report_command(synthetic_sweep, tmp_path):
    result = invoke("report", synthetic_sweep)
    assert result.exit_code == 0 and "report.html" in result.output
    empty = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert empty.exit_code == 1 and "No results database" in empty.output


def test_a_sweep_whose_every_run_failed_exits_non_zero(tmp_path):
    task_options = [f"--task-opt={k}={v}" for k, v in TINY_TASK_OPTIONS.items()]
    common = ["--task", "teacher-student", *task_options, "--batch-sizes", "16",
              "--no-progress", "--no-report"]  # fmt: skip
    path = tmp_path / "bad.toml"
    path.write_text('optimizers = ["adamw"]\n[optimizer.adamw]\nbetas = [0.9, 1.5]\n')
    failed = CliRunner().invoke(
        main, ["sweep", str(tmp_path / "a"), "--file", str(path), "--steps", "2", *common]
    )
    assert failed.exit_code == 1, failed.output
    assert "every run failed, diverged or stayed at chance level (1 failed)" in failed.output
    # the negative control: long enough to learn (after 2 steps it would be at chance level)
    fine_args = ["sweep", str(tmp_path / "b"), "--optimizers", "sgd", "--steps", "25", *common]
    fine = CliRunner().invoke(main, fine_args)
    assert fine.exit_code == 0, fine.output


def test_a_user_task_that_raises_stops_the_sweep_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "raising_task.py").write_text(
        "def build(size: int = 3):\n    raise RuntimeError(f'no data of size {size}')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(
        main, ["sweep", str(tmp_path / "s"), "--task", "raising_task:build", "--optimizers", "sgd"]
    )
    assert result.exit_code == 2, result.output
    assert "task 'raising_task:build': Task 'raising_task:build' raised RuntimeError: " in (
        result.output
    )
    assert "no data of size 3" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
