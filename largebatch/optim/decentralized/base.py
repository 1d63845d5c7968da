"""What DmSGD and DecentLaM share: validation, state, the gossip round and the step's shape.

A decentralized step has three phases. Each parameter group *prepares* the tensors
its rank sends (from the local gradient; the algorithm's ``prepare``), one gossip
round averages all groups' tensors with the neighbours at once (one message per
neighbour and dtype, whatever the number of groups), then each group *finishes* its
update from the averaged tensors (the algorithm's ``finish``). A parameter without a
gradient on this rank is only averaged with its neighbours, so that every rank sends
the same tensors in every round.

Under data parallelism the training loop must leave the gradients local (this
rank's share of the batch): the optimizers declare ``StepProtocol(local_gradients=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.sgd import sgd

from largebatch.optim.decentralized.gossip import Gossip
from largebatch.optim.decentralized.topology import TOPOLOGIES, Topology
from largebatch.optim.protocol import StepProtocol

Prepare = Callable[..., list[Tensor]]
Finish = Callable[..., None]
#: the group entries every ``prepare`` and ``finish`` receives as keyword arguments
SETTINGS = ("lr", "momentum", "weight_decay", "nesterov", "foreach")


def check_hyperparameters(
    lr: float, momentum: float, weight_decay: float, nesterov: bool, *, lr_positive: bool
) -> None:
    """``ValueError`` naming the first invalid value (``lr > 0`` if ``lr_positive``)."""
    lowest = "> 0" if lr_positive else ">= 0"
    if not (
        isinstance(lr, int | float) and math.isfinite(lr) and (lr > 0 if lr_positive else lr >= 0)
    ):
        raise ValueError(f"Invalid learning rate: {lr} (must be {lowest})")
    if not (isinstance(momentum, int | float) and 0.0 <= momentum < 1.0):
        raise ValueError(f"Invalid momentum value: {momentum} (must be in [0, 1))")
    if not (isinstance(weight_decay, int | float) and math.isfinite(weight_decay)):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if weight_decay < 0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    if not isinstance(nesterov, bool):
        raise ValueError(f"Invalid nesterov value: {nesterov!r}; expected True or False")
    if nesterov and momentum == 0:
        raise ValueError("Invalid nesterov value: True (Nesterov momentum needs momentum > 0)")


def check_topology_name(topology: Any) -> None:
    """``ValueError`` unless ``topology`` is a :class:`Topology` or the name of one."""
    if not isinstance(topology, Topology) and not (
        isinstance(topology, str) and topology in TOPOLOGIES
    ):
        raise ValueError(
            f"Invalid topology: {topology!r} (choose from {', '.join(TOPOLOGIES)}, "
            "or pass a Topology)"
        )


class DecentralizedOptimizer(torch.optim.Optimizer):
    """Base of the decentralized optimizers: one gossip round per step over ``process_group``.

    A subclass gives, per parameter group, the algorithm's ``prepare`` and ``finish``
    (:meth:`_phases`) and says whether it divides by the learning rate
    (:meth:`_divides_by_lr`). The gossip is set up on first use, so an optimizer can be
    built (and its hyperparameters judged) before ``torch.distributed`` is; stepping
    needs a process group of at least 2 processes.
    """

    step_protocol: ClassVar[StepProtocol] = StepProtocol(local_gradients=True)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        topology: str | Topology,
        process_group: Any,
    ) -> None:
        self._check_group(defaults)
        check_topology_name(topology)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self._topology = topology
        self._process_group = process_group
        self._gossip: Gossip | None = None
        if isinstance(topology, Topology):
            self._check_topology(topology)
        if dist.is_available() and dist.is_initialized():
            self._gossip = self._start_gossip()  # rejects a world of one process

    @property
    def process_group(self) -> Any:
        """The ranks that gossip (``None``: all processes)."""
        return self._process_group

    @property
    def gossip(self) -> Gossip:
        """The neighbour exchange (set up on first use; ``ConfigError`` below 2 processes)."""
        if self._gossip is None:
            self._gossip = self._start_gossip()
        return self._gossip

    def _start_gossip(self) -> Gossip:
        gossip = Gossip(self._topology, self._process_group)
        if isinstance(self._topology, str):  # its size is known only now
            self._check_topology(gossip.topology)
        return gossip

    def _check_topology(self, topology: Topology) -> None:
        """Called once the graph and its size are known: a warning for a bad pairing."""

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and groups; a copy sets its gossip up anew
        return {
            **super().__getstate__(),
            "_topology": self._topology,
            "_process_group": self._process_group,
            "_gossip": None,
        }

    def _check_group(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming the first invalid hyperparameter of ``group``."""
        check_hyperparameters(
            group["lr"],
            group["momentum"],
            group["weight_decay"],
            group["nesterov"],
            lr_positive=self._divides_by_lr(group),
        )
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"Invalid foreach value: {group['foreach']!r}")

    def _divides_by_lr(self, group: dict[str, Any]) -> bool:
        """Whether ``group``'s update divides by its learning rate (which must then be > 0)."""
        return False

    def _phases(self, group: dict[str, Any]) -> tuple[Prepare, Finish]:
        """``(prepare, finish)`` of one group's algorithm (called with the group's :data:`SETTINGS`)."""
        raise NotImplementedError

    def _extra_mixed(self, group: dict[str, Any], idle: list[Tensor]) -> list[Tensor]:
        """Tensors averaged in place for the parameters ``idle`` (those without a gradient)."""
        return idle

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One local update and one gossip round; returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [group["params"] for group in self.param_groups]
        if any(p.grad is not None and p.grad.is_sparse for params in groups for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        for group in self.param_groups:
            if self._divides_by_lr(group) and not group["lr"] > 0:
                raise ValueError(
                    f"Invalid learning rate: {group['lr']} ({type(self).__name__} divides by "
                    "it; a schedule must keep it > 0)"
                )
        gossip = self.gossip
        first = self.state[self.param_groups[0]["params"][0]]
        round_ = first.setdefault("gossip_round", 0)

        finishes, sent = [], []
        for group in self.param_groups:
            params, grads, buffers, idle = self._init_group(group)
            prepare, finish = self._phases(group)
            settings = {name: group[name] for name in SETTINGS}
            outgoing = prepare(params, grads, buffers, **settings) if params else []
            finishes.append((finish, params, grads, buffers, outgoing, settings))
            sent += outgoing + self._extra_mixed(group, idle)
        gossip.mix_(sent, round_)
        for finish, params, grads, buffers, mixed, settings in finishes:
            if params:
                finish(params, grads, buffers, mixed, **settings)
        first["gossip_round"] = round_ + 1
        return loss

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Parameters with a gradient, their gradients and momentum buffers; those without one.

        Every parameter gets its (zero) momentum buffer on the first step, so that
        every rank exchanges the same tensors from the start.
        """
        params, grads, buffers, idle = [], [], [], []
        for p in group["params"]:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if p.grad is None:
                idle.append(p)
            else:
                params.append(p)
                grads.append(p.grad)
                buffers.append(state["momentum_buffer"])
        return params, grads, buffers, idle


def momentum_step_(
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    foreach: bool | None,
    weight_decay: float = 0.0,
) -> None:
    """With ``u = d + weight_decay x``: ``m <- momentum m + u;  x <- x - lr (u + momentum m
    if nesterov else m)``.

    The local heavy-ball step of every algorithm here, done by ``torch.optim.SGD``'s
    functional core (its single-tensor and multi-tensor paths), without dampening;
    ``directions`` are left as they are.
    """
    sgd(
        params,
        directions,
        list(buffers),
        foreach=foreach,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=0.0,
        nesterov=nesterov,
        maximize=False,
    )


def decayed(params: list[Tensor], grads: list[Tensor], weight_decay: float) -> list[Tensor]:
    """``g + weight_decay * x``: new tensors, or the gradients themselves if there is no decay."""
    if weight_decay == 0:
        return list(grads)
    return list(torch._foreach_add(grads, params, alpha=weight_decay))
