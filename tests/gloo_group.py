"""Run a test's worker in a 2-process gloo group (forked, so torch is not imported again).

The worker is called as ``worker(rank, out)`` with ``out`` the test's directory for
results. After it returns, the process leaves with ``os._exit`` once every rank is
done (a barrier), without destroying the group: destroying a gloo group joins its
threads while holding the GIL, which deadlocks when one of them is still releasing
a Python callback of a DDP communication hook (seen after ``torch.func`` ran in the
parent). An exception in the worker ends the process the usual way and is reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_in_gloo_group(worker: Callable[[int, str], None], tmp_path: Path, world: int = 2) -> None:
    mp.start_processes(
        _entry,
        args=(worker, str(tmp_path / "store"), str(tmp_path), world),
        nprocs=world,
        start_method="fork",
    )


def _entry(rank: int, worker: Callable[[int, str], None], store: str, out: str, world: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    worker(rank, out)
    leave_group()


def leave_group() -> NoReturn:
    """End a gloo worker process that succeeded: wait for every rank, then exit without
    destroying the group (see the module docstring). For workers started any other way too."""
    dist.barrier()
    os._exit(0)
