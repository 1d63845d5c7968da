"""``largebatch sweep`` stopped with Ctrl-C: one message saying what is kept and how to go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRAIN_TESTS = Path(__file__).parents[1] / "train"  # tiny_train_task: a task that can sleep


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_sigint_to_a_sweep_says_the_checkpoints_are_kept_and_how_to_resume(tmp_path):
    directory = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "largebatch", "sweep", str(directory),
        "--task", "tiny_train_task:build", "--task-opt", "delay=0.05", "--batch-sizes", "32",
        "--optimizers", "sgd", "--steps", "400", "--evals-per-run", "100",
        "--no-progress", "--no-report",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TRAIN_TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    sweep = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(directory.glob("runs/*/checkpoints/step-*.pt")):
            assert sweep.poll() is None, sweep.communicate()
            assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
            time.sleep(0.05)
        sweep.send_signal(signal.SIGINT)
        _, stderr = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    message = stderr.decode()
    assert sweep.returncode == 1, message
    assert (
        "Interrupted; finished runs are recorded and the others keep their checkpoints. "
        "Run the same command again to continue." in message
    )
    assert "Traceback" not in message
    assert list(directory.glob("runs/*/checkpoints/step-*.pt"))
