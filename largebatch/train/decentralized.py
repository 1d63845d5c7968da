"""What the loop does for a decentralized optimizer (``StepProtocol.local_gradients``).

Each process keeps its own parameters ``x_i``, so:

* evaluation runs at the processes' average ``x̄ = (1/n) sum_i x_i``, the model
  DecentLaM's paper reports; the same all-reduce gives the consensus distance
  ``(1/n) sum_i ||x_i - x̄||^2`` (parameters only), logged with the bytes each
  process sent per step;
* a checkpoint holds every process's model and optimizer state (``ranks``) and
  ``x̄`` as its ``model``; on resume each process takes back its own.

Floating-point buffers (batch-norm statistics) stay local during training and are
averaged with the parameters for evaluation. For any other run every method here
does nothing, so the loop has one code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from largebatch.optim import StepProtocol
from largebatch.optim.decentralized.gossip import flatten, unflatten_
from largebatch.train import distributed
from largebatch.train.distributed import Distributed

COLUMNS = ["consensus_distance", "gossip_bytes_per_step"]


class DecentralizedRun:
    """The decentralized part of a run: averaged evaluation, consensus, per-rank checkpoints.

    ``active`` only for an optimizer with ``local_gradients`` under data parallelism;
    such an optimizer has a ``gossip`` (:class:`~largebatch.optim.decentralized.Gossip`)
    whose counters give the bytes per step.
    """

    def __init__(
        self, active: bool, optimizer: torch.optim.Optimizer, model: nn.Module, ddp: Distributed
    ) -> None:
        self.active = active
        self.optimizer, self.model, self.ddp = optimizer, model, ddp
        self._distance: float | None = None
        self._bytes_per_step: float | None = None
        self._counted = (0, 0)  # gossip (bytes, rounds) at the last measurement

    @classmethod
    def for_run(
        cls,
        protocol: StepProtocol,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        ddp: Distributed,
    ) -> DecentralizedRun:
        return cls(protocol.local_gradients and ddp.enabled, optimizer, model, ddp)

    @property
    def columns(self) -> list[str]:
        """The ``metrics.csv`` columns this run adds."""
        return COLUMNS if self.active else []

    @contextlib.contextmanager
    @torch.no_grad()
    def _holding_average(self) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Within the block the model holds ``x̄`` (a collective); yields (own values, tensors)."""
        tensors = chain(self.model.parameters(), self.model.buffers())
        tensors = [t for t in tensors if t.is_floating_point()]
        own = [t.clone() for t in tensors]
        buckets = flatten(tensors)
        for flat, _ in buckets:
            distributed.all_reduce_mean(flat, self.ddp)
        unflatten_(buckets)
        try:
            yield own, tensors
        finally:
            torch._foreach_copy_(tensors, own)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within the block the model holds ``x̄``; measures the consensus distance (a collective)."""
        if not self.active:
            yield
            return
        with self._holding_average() as (own, tensors):
            params = set(map(id, self.model.parameters()))
            squared = sum(
                float((mine.double() - mean.detach().double()).square().sum())
                for mine, mean in zip(own, tensors)
                if id(mean) in params
            )
            gossip = self.optimizer.gossip
            counted = (gossip.bytes_sent, gossip.rounds)
            sent, rounds = (now - before for now, before in zip(counted, self._counted))
            stats = torch.tensor(
                [squared, sent, rounds], dtype=torch.float64, device=self.ddp.device
            )
            distance, sent, rounds = distributed.all_reduce_mean(stats, self.ddp).tolist()
            self._distance = distance
            if rounds > 0:
                self._bytes_per_step = sent / rounds
                self._counted = counted
            yield

    def row(self) -> dict[str, float | str]:
        """The values of :attr:`columns` at the last :meth:`averaged`."""
        if not self.active:
            return {}
        return {
            "consensus_distance": self._distance,
            "gossip_bytes_per_step": "" if self._bytes_per_step is None else self._bytes_per_step,
        }

    def result(self) -> dict[str, float]:
        """The last consensus distance and bytes per step, for ``RunResult.extra``."""
        if not self.active:
            return {}
        return {"consensus_distance": self._distance, "gossip_bytes_per_step": self._bytes_per_step}

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"model": x̄, "ranks": [every rank's model and optimizer state]}`` (rank 0's; a collective)."""
        if not self.active:
            return {}
        own = _to_cpu({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
        ranks = [None] * self.ddp.world_size if self.ddp.is_main else None
        dist.gather_object(own, ranks, dst=0)
        with self._holding_average():
            average = _to_cpu(self.model.state_dict())
        return {"model": average, "ranks": ranks}


def own_state(saved: dict[str, Any], rank: int) -> dict[str, Any]:
    """This rank's ``model`` and ``optimizer`` state in checkpoint ``saved``."""
    return saved["ranks"][rank] if "ranks" in saved else saved


def _to_cpu(state: Any) -> Any:
    """``state`` with every tensor copied to the CPU (dicts and lists are rebuilt)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(value) for value in state)
    return state
