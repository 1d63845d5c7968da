"""``largebatch sweep --diagnose``: diagnostics columns in the results database, resumable, and
the report's diagnostics sections."""

from __future__ import annotations

import json
import re
import sqlite3

from click.testing import CliRunner
from sweep_helpers import TINY_TASK_OPTIONS

from largebatch.cli import main
from largebatch.experiments import diagnose as diagnose_module
from largebatch.experiments.checkpoint_diagnostics import DiagnosticsSettings
from largebatch.experiments.diagnose import SWEEP_SETTINGS
from largebatch.experiments.results_store import ResultsStore

COLUMNS = ["sharpness", "top_eigenvalue", "hessian_trace", "hessian_trace_stderr"]
SECTIONS = [
    "Sharpness and curvature vs batch size",
    "Interpolation from small- to large-batch solution",
    "Gradient noise scale and the critical batch size",
]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _refuse(*args, **kwargs):
    raise AssertionError("recomputed although already done")


def test_sweep_diagnose_fills_columns_resumes_and_reports(tmp_path, monkeypatch):
    sweep_file = tmp_path / "sweep.toml"
    options = "\n".join(f"{key} = {value}" for key, value in TINY_TASK_OPTIONS.items())
    sweep_file.write_text(
        'task = "teacher-student"\nbatch_sizes = [16, 64]\noptimizers = ["sgd"]\nepochs = 3\n'
        'evals_per_run = 3\naccumulation_steps = 2\ntarget = ["accuracy", 0.3]\n'
        f"[task_options]\n{options}\n"
    )
    directory = tmp_path / "study"
    result = invoke("sweep", directory, "--file", sweep_file, "--diagnose", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "diagnostics: 2 run(s) measured, 0 reused, 0 failed; 1 interpolation(s)" in result.output

    rows = ResultsStore(directory).rows()
    for row in rows:
        assert all(row[column] is not None for column in COLUMNS), row["cell_id"]
        assert row["noise_scale"] > 0  # logged during training (accumulation_steps = 2)
        record = json.loads((directory / row["run_dir"] / "diagnostics.json").read_text())
        assert DiagnosticsSettings.from_dict(record["settings"]) == SWEEP_SETTINGS
        assert row["top_eigenvalue"] == record["eigenvalues"]["eigenvalues"][0]
        assert row["sharpness"] == record["sharpness"][0]["sharpness"]
        assert row["hessian_trace"] == record["trace"]["trace"]
    interpolation = json.loads((directory / "interpolation.json").read_text())
    assert (interpolation["sgd"]["small"]["batch_size"], interpolation["sgd"]["large"]["batch_size"]) == (16, 64)  # fmt: skip

    html = (directory / "report.html").read_text()
    titles = re.findall(r"<h2>(.*?)</h2>", html)
    assert [t for t in titles if t in SECTIONS] == SECTIONS
    for figure in ("sharpness", "interpolation_sgd", "noise_scale"):
        assert (directory / "figures" / f"{figure}.png").read_bytes().startswith(b"\x89PNG")

    # a second pass measures nothing ...
    monkeypatch.setattr(diagnose_module, "run_diagnostics", _refuse)
    monkeypatch.setattr(diagnose_module, "interpolate_runs", _refuse)
    again = invoke("sweep", directory, "--diagnose", "--no-progress", "--no-report")
    assert "diagnostics: 0 run(s) measured, 0 reused, 0 failed; 0 interpolation(s)" in again.output
    # ... and after an interruption between diagnostics.json and the database, reuses the file
    cell = rows[0]["cell_id"]
    with sqlite3.connect(directory / "results.sqlite") as con:
        con.execute("DELETE FROM metrics WHERE cell_id = ? AND name = 'sharpness'", (cell,))
    resumed = invoke("sweep", directory, "--diagnose", "--no-progress", "--no-report")
    assert "diagnostics: 0 run(s) measured, 1 reused" in resumed.output
    restored = {r["cell_id"]: r for r in ResultsStore(directory).rows()}[cell]
    assert restored["sharpness"] == rows[0]["sharpness"]
