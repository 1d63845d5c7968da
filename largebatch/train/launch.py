"""Data-parallel training on this machine: :func:`launch` runs a config in ``nproc`` workers.

Each worker is ``python -m largebatch.train.worker -`` (:mod:`.worker`) with
the environment torchrun would give it (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); the rendezvous store is
hosted here, as torchrun's agent hosts it. The config reaches the workers on
their standard input, so nothing is written to disk for them. The workers

* start only after the checks: everything ``train`` would reject on rank 0
  (task, plan, device, optimizer hyperparameters, run directory) is rejected
  here first, so a bad run starts no process and creates no directory;
* stay in the launcher's process group, so a signal to the group (Ctrl-C in a
  terminal, ``kill -9 -PGID``) reaches them, and die with the launcher however
  it ends (:func:`~largebatch.utils.processes.die_with_parent`);
* hold the run directory's lock together with the launcher (it is handed down),
  so the directory stays locked while any of them lives;
* are stopped if one of them fails and the others do not finish on their own.

Several machines: start the same worker module with torchrun on each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from torch.distributed import TCPStore

from largebatch.tasks import get_task
from largebatch.train.config import RunConfig
from largebatch.train.distributed import pick_device
from largebatch.train.plan import build_optimizer, plan_run
from largebatch.train.run_dir import RunDirectory
from largebatch.utils.locking import DirectoryLock
from largebatch.utils.processes import LAUNCHER_PID_ENV

#: seconds the other workers get to finish on their own after one has failed
GRACE_SECONDS = 10.0


def check(config: RunConfig) -> None:
    """Raise what ``train`` would raise before writing anything, without a model or a process group.

    Builds the task and the plan, checks the devices the workers would take and
    builds the optimizer over a stand-in parameter (its constructor judges its
    hyperparameters).
    """
    task = get_task(config.task, **config.task_options)
    plan = plan_run(config, task)
    pick_device(config.device, local_rank=config.nproc - 1)
    build_optimizer(config, plan, [torch.zeros(1, requires_grad=True)])


def launch(config: RunConfig) -> int:
    """Train ``config`` in ``config.nproc`` worker processes; the workers' exit status.

    0 means every worker finished (the run's outcome is in its ``result.json``);
    otherwise the status of the first worker that failed (``128 + N`` for one
    killed by signal N): 1 for a failed, diverged or chance-level run, 2 for a
    run its worker rejected. Raises before starting anything if :func:`check` does, or
    if the run directory is in use (the lock is taken here, or re-entered if
    the caller holds it).
    """
    check(config)
    run_dir = RunDirectory(config.out_dir)
    run_dir.claim(config)
    try:
        return _run_workers(config, run_dir.lock)
    finally:
        run_dir.release()


def _run_workers(config: RunConfig, lock: DirectoryLock) -> int:
    store = TCPStore("127.0.0.1", 0, config.nproc, is_master=True, wait_for_workers=False)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "WORLD_SIZE": str(config.nproc),
        "LOCAL_WORLD_SIZE": str(config.nproc),
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # rank 0 joins the store above, as under torchrun
        LAUNCHER_PID_ENV: str(os.getpid()),  # the worker dies with this process
        **lock.child_env(),
    }
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: no oversubscription of the cores
    payload = json.dumps({"config": config.to_dict()}).encode()
    workers: list[subprocess.Popen] = []
    try:
        for rank in range(config.nproc):
            worker = subprocess.Popen(
                [sys.executable, "-m", "largebatch.train.worker", "-"],
                stdin=subprocess.PIPE,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                pass_fds=(lock.fd,),
            )
            workers.append(worker)
            try:
                worker.stdin.write(payload)
                worker.stdin.close()
            except BrokenPipeError:  # it died at start; its status says why
                pass
        return _wait(workers)
    finally:
        _stop(workers)  # none left after a normal end; after an interrupt, all of them
        del store


def _wait(workers: list[subprocess.Popen]) -> int:
    """Wait for every worker; after a failure, give the rest :data:`GRACE_SECONDS` to end."""
    failed_at = None
    while True:
        codes = [worker.poll() for worker in workers]
        failures = [code for code in codes if code not in (None, 0)]
        if None not in codes or (failed_at and time.monotonic() - failed_at > GRACE_SECONDS):
            return (failures[0] if failures[0] > 0 else 128 - failures[0]) if failures else 0
        if failures and failed_at is None:
            failed_at = time.monotonic()
        time.sleep(0.05)


def _stop(workers: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Stop the workers still running: ``SIGTERM``, then ``SIGKILL`` after ``grace`` seconds."""
    running = [worker for worker in workers if worker.poll() is None]
    for worker in running:
        worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for worker in running:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
