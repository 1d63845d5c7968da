"""Data parallelism on ``torch.distributed``, in the few lines nanoGPT needs.

A process launched by torchrun finds ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
in its environment; that alone switches data parallelism on (gloo on CPU, NCCL
on GPU). Without them everything here is a no-op, so the loop has one code path.
Multi-node runs need nothing more: torchrun's rendezvous sets the same variables.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: ``enabled`` is False for a plain single-process run."""

    enabled: bool
    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress and writes files."""
        return self.rank == 0


def check_device(requested: str) -> None:
    """Raise ``ValueError`` unless ``requested`` is auto, cpu, cuda or cuda:N."""
    if requested != "auto" and requested.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"Invalid device: {requested!r} (auto, cpu, cuda or cuda:N)")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU if CUDA is available, else the CPU."""
    check_device(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def setup(requested_device: str = "auto") -> Distributed:
    """Join the process group if launched by torchrun; pick the device either way.

    If the caller already initialised the process group it is reused and left open.
    """
    enabled = int(os.environ.get("RANK", -1)) != -1
    if not enabled:
        return Distributed(False, 0, 1, pick_device(requested_device), False)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(True, dist.get_rank(), dist.get_world_size(), device, owns)


def teardown(ddp: Distributed) -> None:
    """Leave the process group if :func:`setup` created it."""
    if ddp.owns_process_group:
        dist.destroy_process_group()


def wrap(model: nn.Module, ddp: Distributed) -> nn.Module:
    """``DistributedDataParallel(model)`` under data parallelism, else ``model`` itself."""
    if not ddp.enabled:
        return model
    device_ids = [ddp.device.index] if ddp.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """Keep gradients local for the enclosed backward (DDP ``no_sync``) when ``skip_sync``."""
    if skip_sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def barrier(ddp: Distributed) -> None:
    """Wait until every process gets here."""
    if ddp.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ddp: Distributed) -> torch.Tensor:
    """Sum ``tensor`` over processes, in place (gloo has no average)."""
    if ddp.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, ddp: Distributed) -> torch.Tensor:
    """Average ``tensor`` over processes, in place."""
    if ddp.enabled:
        all_reduce_sum(tensor, ddp).div_(ddp.world_size)
    return tensor


def gather_objects(obj: Any, ddp: Distributed) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list without DDP)."""
    if not ddp.enabled:
        return [obj]
    objects: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(objects, obj)
    return objects


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``python -m largebatch <args>`` in ``nproc`` processes on this node via torchrun.

    Returns torchrun's exit status. ``--standalone`` picks a free rendezvous port.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "largebatch", *args,
    ]  # fmt: skip
    return subprocess.call(command)
