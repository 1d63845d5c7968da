"""``benchmarks/gpu_check.sh``: its time limits fit the budget, and a CPU dry run of cheap parts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def limits() -> tuple[dict[str, int], int, int]:
    """Each part's limit (in running order), the grace and the default budget, as printed."""
    printed = subprocess.run(
        ["bash", str(SCRIPT), "--limits"], capture_output=True, text=True, check=True
    ).stdout
    values = dict(line.split() for line in printed.splitlines())
    grace, budget = int(values.pop("grace")), int(values.pop("budget"))
    return {name: int(seconds) for name, seconds in values.items()}, grace, budget


def test_the_limits_with_their_grace_fit_the_budget_and_the_headline_parts_run_first():
    parts, grace, budget = limits()
    assert sum(parts.values()) + grace * len(parts) <= budget == 480
    assert list(parts)[:3] == ["env", "optimizer", "shampoo"]
    # every part the script runs has a limit, and they run in the order listed
    assert re.findall(r"^part (\w+)", SCRIPT.read_text(), re.MULTILINE) == list(parts)


@pytest.mark.slow
def test_a_cpu_dry_run_of_cheap_parts_reports_them_ok(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_PARTS": "env run",
        "GPU_CHECK_OUT": str(out),
        "GPU_CHECK_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.log", "summary.md"]
    summary = (out / "summary.md").read_text()
    rows = re.findall(r"^\| (\w+) \| (.+?) \| \d+ s \|$", summary, re.MULTILINE)
    assert rows == [("env", "ok"), ("run", "ok")], summary
    assert "Device: cpu." in summary and "torch" in summary
    assert "test_accuracy" in summary  # the run's last line, under its heading
