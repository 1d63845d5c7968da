"""Worker processes end with whoever started them, and a run directory has one writer.

Linux only (``/proc`` tells which processes are alive and whose children they are).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_train_task import TINY_TASK, final_checkpoint, read_metrics

from largebatch.cli import main
from largebatch.utils.errors import RunDirectoryError
from largebatch.utils.locking import DirectoryLock, locked

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
HERE = Path(__file__).parent


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path / "tmp"),  # anything left behind in a temporary file shows here
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }


def _slow_run(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "largebatch", "run", "--task", TINY_TASK,
        "--task-opt", "delay=0.05", "--batch-size", "32", "--steps", "400", "--eval-every", "100",
        "--checkpoint-every", "2", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL to the group", "SIGTERM", "SIGINT"])
def test_killing_the_launcher_ends_its_workers(tmp_path, how):
    """``largebatch run --nproc 2``: whatever ends the launcher ends the workers too (SIGTERM
    kills the launcher outright, as SIGKILL would); the run directory is free again at once
    and no temporary file is left behind."""
    out = tmp_path / "run"
    launcher = subprocess.Popen(
        _slow_run(out, "--nproc", "2"), env=_env(tmp_path), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: any((out / "checkpoints").glob("step-*.pt")), 120, "training to start")
        workers = descendants(launcher.pid)
        assert len(workers) >= 2, workers
        if how == "SIGKILL to the group":
            os.killpg(launcher.pid, signal.SIGKILL)
        else:
            os.kill(launcher.pid, getattr(signal, how))
        _, stderr = launcher.communicate(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in workers), 15, "the workers to end")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    with locked(out):  # nobody writes there any more
        pass
    assert list((tmp_path / "tmp").glob("*.json")) == []  # no temporary config
    if how == "SIGINT":
        assert launcher.returncode == 130
        message = stderr.decode()
        assert f"The checkpoints are kept in {out / 'checkpoints'}" in message
        assert f"largebatch run --out {out} --resume" in message


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_fails_at_once(tmp_path):
    """Two runs with the same --out: the second stops with one line naming the directory and
    the first's files are its own."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        _slow_run(out, "--seed", "1", "--steps", "60", "--checkpoint-every", "30"),
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: (out / "config.json").exists(), 120, "the first run to start")
        second = CliRunner().invoke(
            main, ["run", "--task", TINY_TASK, "--steps", "4", "--seed", "2", "--out", str(out)]
        )
        assert second.exit_code == 1, second.output
        (line,) = second.output.strip().splitlines()
        assert line == (
            f"Error: {out} is in use by another process (pid {first.pid}); wait for it to "
            "finish or choose another directory"
        )
        assert first.wait(120) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
    config = (out / "config.json").read_text()
    assert '"seed": 1' in config and '"seed": 2' not in config
    assert '"status": "done"' in (out / "result.json").read_text()


def test_a_lock_handed_to_a_child_holds_while_the_child_lives(tmp_path):
    """The launcher's lock, handed down to a worker, keeps the directory locked after the
    launcher lets go, until the worker ends."""
    lock = DirectoryLock(tmp_path)
    lock.acquire()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from largebatch.utils.locking import DirectoryLock; "
         f"DirectoryLock({str(tmp_path)!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
        env={**os.environ, **lock.child_env()}, pass_fds=(lock.fd,),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout.readline() == b"held\n"  # the child took the lock it was handed
        lock.release()
        errors = []

        def other_writer() -> None:  # another thread is another writer
            try:
                DirectoryLock(tmp_path).acquire()
            except RunDirectoryError as error:
                errors.append(error)

        thread = threading.Thread(target=other_writer)
        thread.start()
        thread.join()
        assert len(errors) == 1 and "is in use by another process" in str(errors[0])
    finally:
        child.kill()
        child.wait()
    with locked(tmp_path):  # free once the child is gone
        pass


@pytest.mark.slow
def test_a_killed_sweep_takes_its_workers_along(tmp_path):
    """``largebatch sweep --jobs 2`` killed with SIGKILL (its process alone): the processes
    running its cells end too, so a new sweep can take over their directories at once."""
    options = [f"--task-opt={key}={value}" for key, value in {
        "num_train": 2000, "num_test": 100, "input_dim": 8, "num_classes": 4,
        "teacher_hidden": 8, "student_hidden": 16}.items()]  # fmt: skip
    command = [
        sys.executable, "-m", "largebatch", "sweep", str(tmp_path / "sweep"), "--task",
        "teacher-student", *options, "--batch-sizes", "8,16", "--optimizers", "sgd",
        "--epochs", "50", "--jobs", "2", "--no-report", "--no-progress",
    ]  # fmt: skip
    sweep = subprocess.Popen(
        command, env=_env(tmp_path), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        runs = tmp_path / "sweep" / "runs"
        wait_for(lambda: len(list(runs.glob("*/checkpoints/step-*.pt"))) >= 2, 120, "two cells")
        workers = descendants(sweep.pid)
        assert len(workers) >= 2, workers
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait(30)
        wait_for(lambda: not any(alive(pid) for pid in workers), 15, "the cells' processes to end")
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    for run_dir in runs.iterdir():
        with locked(run_dir):
            pass


def assert_bitwise_equal(mine, reference, where: str) -> None:
    """Equal structure, and every tensor ``torch.equal`` (same dtype, shape and bits)."""
    assert type(mine) is type(reference), where
    if isinstance(reference, dict):
        assert mine.keys() == reference.keys(), where
        for key in reference:
            assert_bitwise_equal(mine[key], reference[key], f"{where}[{key!r}]")
    elif isinstance(reference, (list, tuple)):
        assert len(mine) == len(reference), where
        for index, (a, b) in enumerate(zip(mine, reference)):
            assert_bitwise_equal(a, b, f"{where}[{index}]")
    elif isinstance(reference, torch.Tensor):
        assert mine.dtype == reference.dtype and torch.equal(mine, reference), where
    else:
        assert mine == reference, where


@pytest.mark.slow
def test_a_decentralized_run_killed_outright_resumes_bit_for_bit(tmp_path):
    """``largebatch run --nproc 4 --optimizer decentlam``, its process group killed with
    SIGKILL after a checkpoint, then ``--resume``: every rank's parameters and optimizer
    state and the logged rows end as those of the same run uninterrupted."""
    run = [
        *_slow_run(tmp_path / "killed", "--nproc", "4", "--optimizer", "decentlam", "--topology",
                   "ring", "--steps", "40", "--eval-every", "10", "--checkpoint-every", "3"),
    ]  # fmt: skip
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(
        run, env=_env(tmp_path), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: (killed / "checkpoints" / "step-000000006.pt").exists(), 180, "step 6")
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert not (killed / "result.json").exists()  # it died mid-run
    resume = [sys.executable, "-m", "largebatch", "run", "--out", str(killed), "--resume"]
    subprocess.run(resume, env=_env(tmp_path), check=True, capture_output=True, timeout=300)
    whole = [
        *run[: run.index("--out") + 1],
        str(tmp_path / "whole"),
        *run[run.index("--out") + 2 :],
    ]
    subprocess.run(whole, env=_env(tmp_path), check=True, capture_output=True, timeout=300)

    ours, theirs = (final_checkpoint(str(tmp_path / name)) for name in ("killed", "whole"))
    assert len(ours["ranks"]) == 4
    for rank, (mine, reference) in enumerate(zip(ours["ranks"], theirs["ranks"])):
        assert reference["optimizer"]["state"]  # momentum buffers to compare
        assert_bitwise_equal(mine, reference, f"rank {rank}")
    columns = lambda name: [  # noqa: E731
        {k: v for k, v in row.items() if k != "time"} for row in read_metrics(str(tmp_path / name))
    ]
    assert columns("killed") == columns("whole")
