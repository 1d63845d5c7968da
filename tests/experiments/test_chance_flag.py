"""Chance-level runs end to end in a sweep: the database, the CLI warning, the report, the tables."""

from __future__ import annotations

import json

from click.testing import CliRunner

from largebatch.cli import main
from largebatch.experiments import analysis
from largebatch.experiments.report import summary
from largebatch.experiments.results_store import ResultsStore

TINY = {
    "num_train": 400, "num_test": 100, "input_dim": 8, "num_classes": 4,
    "teacher_hidden": 8, "student_hidden": 16,
}  # fmt: skip


def test_a_collapsed_cell_is_flagged_everywhere_like_a_divergence(tmp_path):
    """SGD at lr 20 collapses to a constant output (status "chance"); lr 0.3 learns. The
    chance-level cell is recorded with its reason, warned about, excluded from every mean,
    loses the learning-rate choice and is listed with the problem runs of the report; a
    sweep of it alone, and `largebatch run` of it, exit with status 1 (no result)."""
    directory = tmp_path / "sweep"
    args = [
        "sweep", str(directory), "--task", "teacher-student",
        *(f"--task-opt={k}={v}" for k, v in TINY.items()),
        "--batch-sizes", "64", "--optimizers", "sgd", "--lrs", "0.3,20", "--epochs", "3",
        "--evals-per-run", "2", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = {row["lr"]: row for row in ResultsStore(directory).rows()}
    collapsed, learned = rows[20.0], rows[0.3]
    assert collapsed["status"] == "chance" and "no better than chance level" in collapsed["error"]
    assert learned["status"] == "done"
    assert "warning: 1 stayed at chance level" in result.output
    assert f"{collapsed['cell_id']}: training loss" in result.output
    result_file = json.loads((directory / collapsed["run_dir"] / "result.json").read_text())
    assert result_file["status"] == "chance"

    (point,) = analysis.points(rows.values())
    assert point.lr == 0.3  # the chance-level learning rate lost the choice
    only_collapsed = [rows[20.0]]
    (flagged,) = analysis.points(only_collapsed)
    assert flagged.values("final_test_accuracy").size == 0  # left out of means
    assert "chance" in summary(only_collapsed).splitlines()[-1]  # shown as a flag, not a number

    report = (directory / "report.md").read_text()
    assert "## Diverged, chance-level and failed runs" in report
    assert collapsed["cell_id"] in report and "1 at chance level" in report

    only = [*args[:1], str(tmp_path / "only"), *args[2:]]
    only[only.index("0.3,20")] = "20"
    no_result = CliRunner().invoke(main, [*only, "--no-report"])
    assert no_result.exit_code == 1  # like a sweep whose every run diverged or failed
    assert "every run failed, diverged or stayed at chance level (1 stayed" in no_result.output

    config = directory / collapsed["run_dir"] / "config.json"
    again = ["run", "--config", str(config), "--out", str(tmp_path / "again"), "--no-progress"]
    run = CliRunner().invoke(main, again)
    assert run.exit_code == 1, run.output  # no result, as for a diverged run
    assert "chance:" in run.output and "error: training loss" in run.output
