"""Checkpoints: atomic writes, verified loads with fallback, exact resume (also after SIGKILL)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_train_task import TINY_TASK, final_checkpoint, read_metrics

from largebatch.cli.run import run
from largebatch.train import train
from largebatch.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

HERE = Path(__file__).parent


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _rows_without_time(out_dir: str) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "time"} for row in read_metrics(out_dir)]


def test_truncated_or_corrupt_checkpoint_gives_clear_error_and_falls_back(tmp_path):
    directory = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(directory, step, {"step": step, "weights": torch.full((100,), step)})
    assert [p.name for p in list_checkpoints(directory)] == [
        "step-000000002.pt",
        "step-000000003.pt",
    ]

    newest = directory / "step-000000003.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        state, path = load_latest(directory)
    assert state["step"] == 2 and path.name == "step-000000002.pt"
    assert (directory / "step-000000003.pt.corrupt").exists()  # moved out of the way

    previous = directory / "step-000000002.pt"
    data = bytearray(previous.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle
    previous.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt \\(checksum mismatch\\)"):
        load_checkpoint(previous)
    with (
        pytest.warns(UserWarning),
        pytest.raises(CheckpointError, match="No usable checkpoint"),
    ):
        load_latest(directory)
    assert load_latest(tmp_path / "empty") is None


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))  # noqa: NPY002
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # noqa: NPY002


def test_resume_falls_back_past_a_corrupt_checkpoint_and_continues_exactly(make_config):
    common = dict(steps=12, checkpoint_every=4, eval_every=3, optimizer_options={"momentum": 0.9})
    train(make_config("uninterrupted", **common))

    # a finished run whose newest checkpoint (step 12) rots: resume falls back to step 8
    partial = make_config("resumed", **common)
    train(partial)
    checkpoints = Path(partial.out_dir) / "checkpoints"
    newest = list_checkpoints(checkpoints)[-1]
    newest.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="falling back"):
        result = train(make_config("resumed", resume=True, **common))

    assert result.status == "done" and result.steps == 12
    reference = final_checkpoint(make_config("uninterrupted").out_dir)
    resumed = final_checkpoint(partial.out_dir)
    _assert_bitwise_equal(reference["model"], resumed["model"])
    assert _rows_without_time(partial.out_dir) == _rows_without_time(
        make_config("uninterrupted").out_dir
    )


def test_resume_refuses_a_different_config(make_config):
    train(make_config("run", steps=4))
    with pytest.raises(ValueError, match="config differs in steps"):
        train(make_config("run", steps=6, resume=True))
    with pytest.raises(ValueError, match="already holds a run"):
        train(make_config("run", steps=4))


#: name -> (command-line options, the same as RunConfig fields) of the killed runs
KILLED_RUNS = {
    "sgd": (
        ["--optimizer", "sgd", "--opt", "momentum=0.9", "--warmup", "5"],
        dict(optimizer="sgd", optimizer_options={"momentum": 0.9}, warmup_steps=5),
    ),
    # the batch-size controller's state, a variable-size stream and the statistics' RNG draws
    "norm-test": (
        ["--optimizer", "sgd", "--opt", "momentum=0.9", "--warmup", "0", "--batch-growth",
         "norm-test", "--batch-growth-theta", "0.3", "--max-batch-size", "64"],
        dict(optimizer="sgd", optimizer_options={"momentum": 0.9}, warmup_steps=0,
             batch_growth="norm-test", batch_growth_theta=0.3, max_batch_size=64),
    ),
    # snapshots (every 6 steps) and an iterate average
    "svrg": (
        ["--optimizer", "svrg", "--opt", "inner_steps=6", "--warmup", "0", "--averaging",
         "polyak", "--averaging-start", "10"],
        dict(optimizer="svrg", optimizer_options={"inner_steps": 6}, warmup_steps=0,
             averaging="polyak", averaging_start=10),
    ),
}  # fmt: skip


def _assert_same_state(expected, actual, where: str = "") -> None:
    """Nested checkpoint states equal, tensors bitwise."""
    if torch.is_tensor(expected):
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            _assert_same_state(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, list | tuple):
        assert len(expected) == len(actual), where
        for i, (a, b) in enumerate(zip(expected, actual)):
            _assert_same_state(a, b, f"{where}/{i}")
    else:
        assert expected == actual or (expected != expected and actual != actual), where


@pytest.mark.parametrize("name", KILLED_RUNS)
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(make_config, tmp_path, name):
    """Kill a CLI run with SIGKILL mid-training, resume it, compare with a run never killed.

    Also with a growing batch (norm test) and with SVRG's snapshots and an iterate average:
    parameters, the whole optimizer state, the controller's and the average's states and
    every logged row are those of the uninterrupted run."""
    options, fields = KILLED_RUNS[name]
    steps, every = 40, 4
    killed_dir = tmp_path / "killed"
    args = [
        "--task", TINY_TASK, "--task-opt", "delay=0.01", "--task-opt", "dropout=0.2",
        *options, "--lr", "0.05", "--batch-size", "16",
        "--steps", str(steps), "--checkpoint-every", str(every), "--eval-every", "3",
        "--no-progress",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "largebatch", "run"]
    kill_after = random.randint(1, steps // every - 2) * every  # a checkpoint before the end
    process = subprocess.Popen(
        [*command, *args, "--out", str(killed_dir)], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done = [int(p.stem.split("-")[1]) for p in list_checkpoints(killed_dir / "checkpoints")]
        if done and max(done) >= kill_after:
            time.sleep(
                random.uniform(0, 0.03)
            )  # a few steps on: the kill lands between checkpoints
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    assert not (killed_dir / "result.json").exists(), f"run finished before the kill ({kill_after})"

    # resume through the CLI (in this process: the kill above was the part that needs a process)
    resumed = CliRunner().invoke(run, ["--out", str(killed_dir), "--resume", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "done: 40 steps" in resumed.output

    reference = make_config(
        "reference", task_options={"delay": 0.0, "dropout": 0.2},
        lr=0.05, steps=steps, checkpoint_every=every, eval_every=3, **fields,
    )  # fmt: skip
    train(reference)
    expected, actual = final_checkpoint(reference.out_dir), final_checkpoint(str(killed_dir))
    _assert_bitwise_equal(expected["model"], actual["model"])
    assert expected["progress"]["step"] == actual["progress"]["step"] == steps
    for part in ("optimizer", "data", "batch_growth", "averaging"):
        _assert_same_state(expected[part], actual[part], part)
    rows = _rows_without_time(str(killed_dir))
    assert [int(r["step"]) for r in rows] == [0, *range(3, steps, 3), steps]  # none twice
    assert rows == _rows_without_time(reference.out_dir), f"killed after step {kill_after}"
