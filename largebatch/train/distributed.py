"""Data parallelism on ``torch.distributed``, in the few lines nanoGPT needs.

A worker process (started by ``launch.py`` or by torchrun) finds ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
in its environment; that alone switches data parallelism on (gloo on CPU, NCCL
on GPU). Without them everything here is a no-op, so the loop has one code path.
Multi-node runs need nothing more: torchrun's rendezvous sets the same variables.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.utils.errors import ConfigError


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
    """``ConfigError`` unless ``requested`` is auto, cpu, cuda or cuda:N (a pure check)."""
    kind, colon, index = requested.partition(":")
    if requested != "auto" and not (
        (kind == "cpu" and not colon) or (kind == "cuda" and (not colon or index.isdigit()))
    ):
        raise ConfigError(f"Invalid device: {requested!r} (auto, cpu, cuda or cuda:N)")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU if CUDA is available, else the CPU.

    ``ConfigError`` if ``requested`` names a CUDA device this machine does not have.
    """
    check_device(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda", local_rank) if requested == "cuda" else torch.device(requested)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index >= count:
            why = (
                "this torch has no CUDA support"
                if not torch.backends.cuda.is_built()
                else (f"this machine has {count} CUDA device(s)")
            )
            if requested == "cuda" and local_rank:
                why += f"; local rank {local_rank} needs cuda:{local_rank}"
            raise ConfigError(f"Invalid device: {requested!r} ({why})")
    return device


def setup(requested_device: str = "auto") -> Distributed:
    """Join the process group if this is a worker process; pick the device either way.

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


def wrap(model: nn.Module, ddp: Distributed, sync_gradients: bool = True) -> nn.Module:
    """``DistributedDataParallel(model)`` under data parallelism, else ``model`` itself.

    Without ``sync_gradients`` (decentralized optimizers, which average parameters
    themselves) the model is not wrapped; every process starts from rank 0's
    parameters and buffers, as DDP would make it.
    """
    if not ddp.enabled:
        return model
    if not sync_gradients:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
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


def broadcast_object(obj: Any, ddp: Distributed) -> Any:
    """Rank 0's ``obj`` on every process (``obj`` itself without DDP)."""
    if not ddp.enabled:
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def on_rank_zero(ddp: Distributed, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on rank 0 alone; its result on every process, or its error raised on all.

    For what only rank 0 may do (lock and check the run directory, pick the
    checkpoint): the other processes must not wait in a collective for a rank
    that has given up.
    """
    if not ddp.enabled:
        return fn(*args)
    outcome: tuple[Any, Exception | None] = (None, None)
    if ddp.is_main:
        try:
            outcome = (fn(*args), None)
        except Exception as error:
            outcome = (None, error)
    result, error = broadcast_object(outcome, ddp)
    if error is not None:
        raise error
    return result


def gather_objects(obj: Any, ddp: Distributed) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list without DDP)."""
    if not ddp.enabled:
        return [obj]
    objects: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(objects, obj)
    return objects
