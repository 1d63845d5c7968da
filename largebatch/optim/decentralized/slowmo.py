"""SlowMo: slow momentum over a decentralized optimizer (Wang, Tantia, Ballas & Rabbat, ICLR 2020).

Every rank runs the base algorithm (DmSGD, DecentLaM: one gossip round per step) for
``slow_every`` steps (tau) from the anchor ``x_{t,0}``; then the ranks average exactly
(one all-reduce) and take a heavy-ball step on the displacement of the round::

    x_{t,tau} = (1/n) sum_i x_{i,t,tau}                        exact average
    u <- slow_momentum u + (x_{t,0} - x_{t,tau}) / lr           lr: the base's rate now
    x_{t+1,0} = x_{t,0} - slow_lr lr u

and every rank restarts from ``x_{t+1,0}``. The base's momentum buffers are averaged at
the same time (our choice; keeping them local would let the ranks drift apart again at
once). ``slow_momentum=0, slow_lr=1`` is the base with an exact average every ``tau``
steps; with the complete graph as the base's topology that is the base itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.decentralized.base import DecentralizedOptimizer
from largebatch.optim.decentralized.gossip import Gossip
from largebatch.optim.wrapper import OptimizerWrapper


def _single_tensor_slowmo(params, anchors, slow_buffers, *, lr, slow_momentum, slow_lr) -> None:
    for param, anchor, buffer in zip(params, anchors, slow_buffers):
        buffer.mul_(slow_momentum).add_((anchor - param) / lr)
        anchor.add_(buffer, alpha=-slow_lr * lr)
        param.copy_(anchor)


def _multi_tensor_slowmo(params, anchors, slow_buffers, *, lr, slow_momentum, slow_lr) -> None:
    displacements = torch._foreach_sub(anchors, params)
    torch._foreach_div_(displacements, lr)
    torch._foreach_mul_(slow_buffers, slow_momentum)
    torch._foreach_add_(slow_buffers, displacements)
    torch._foreach_add_(anchors, slow_buffers, alpha=-slow_lr * lr)
    torch._foreach_copy_(params, anchors)


def slowmo(
    params: list[Tensor],
    anchors: list[Tensor],
    slow_buffers: list[Tensor],
    *,
    lr: float,
    slow_momentum: float,
    slow_lr: float,
    foreach: bool | None = None,
) -> None:
    """The outer step on exactly averaged ``params``, in place: ``slow_buffers`` become
    ``u``, and ``anchors`` and ``params`` both ``x_{t+1,0}``."""
    if not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr} (SlowMo divides by it; it must be > 0)")
    step = _single_tensor_slowmo if foreach is False else _multi_tensor_slowmo
    step(params, anchors, slow_buffers, lr=lr, slow_momentum=slow_momentum, slow_lr=slow_lr)


class _Traffic:
    """The base's gossip and SlowMo's averages counted together: what a run logs as the
    bytes per step (``rounds`` are the base's, one per step)."""

    def __init__(self, steps: Gossip, averages: Gossip) -> None:
        self.steps, self.averages = steps, averages

    @property
    def bytes_sent(self) -> int:
        return self.steps.bytes_sent + self.averages.bytes_sent

    @property
    def rounds(self) -> int:
        return self.steps.rounds


class SlowMo(OptimizerWrapper):
    """Slow momentum every ``slow_every`` steps of a decentralized base (module docstring).

    Args:
        base_optimizer: a decentralized optimizer (:class:`DmSGD`, :class:`DecentLaM`); its
            topology is the gossip of the inner steps.
        slow_every: tau, base steps between exact averages (>= 1).
        slow_momentum: beta, the slow heavy-ball factor in [0, 1).
        slow_lr: alpha, the slow learning rate (> 0), relative to the base's rate.

    The outer step takes the multi-tensor path unless the group's ``foreach`` is ``False``
    (the base's switch).
    """

    def __init__(
        self,
        base_optimizer: DecentralizedOptimizer,
        slow_every: int = 12,
        slow_momentum: float = 0.5,
        slow_lr: float = 1.0,
    ) -> None:
        if not isinstance(base_optimizer, DecentralizedOptimizer):
            raise TypeError(
                f"Invalid base optimizer: a {type(base_optimizer).__name__}; SlowMo wraps a "
                "decentralized optimizer (dmsgd, decentlam)"
            )
        super().__init__(
            base_optimizer,
            dict(slow_every=slow_every, slow_momentum=slow_momentum, slow_lr=slow_lr),
        )
        self._averages: Gossip | None = None

    def _check_group(self, group: dict[str, Any]) -> None:
        every, momentum, lr = group["slow_every"], group["slow_momentum"], group["slow_lr"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid slow_every: {every!r} (base steps between averages, >= 1)")
        if not (isinstance(momentum, int | float) and 0.0 <= momentum < 1.0):
            raise ValueError(f"Invalid slow_momentum: {momentum!r} (must be in [0, 1))")
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"Invalid slow_lr: {lr!r} (must be > 0)")

    @property
    def gossip(self) -> _Traffic:
        """The base's gossip and the exact averages, for the bytes a run logs."""
        return _Traffic(self.base_optimizer.gossip, self._average_gossip())

    def _average_gossip(self) -> Gossip:
        if self._averages is None:
            self._averages = Gossip("complete", self.base_optimizer.process_group)
        return self._averages

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_averages": None}  # a copy sets it up anew

    @torch.no_grad()
    def step(self, closure=None):
        """One base step; after every ``slow_every``-th, the exact average and the slow step."""
        groups = self.param_groups
        first = self.state[groups[0]["params"][0]]
        if "slow_steps" not in first:  # x_{0,0}: the ranks start equal (the loop sees to it)
            for group in groups:
                for p in group["params"]:
                    state = self.state[p]
                    state["anchor"] = p.detach().clone()
                    state["slow_buffer"] = torch.zeros_like(p)
            first["slow_steps"] = 0
        loss = self.base_optimizer.step(closure)
        first["slow_steps"] += 1
        every = {group["slow_every"] for group in groups}
        if len(every) > 1:
            raise ValueError(f"Invalid slow_every: {sorted(every)} (one value for every group)")
        if first["slow_steps"] % every.pop() == 0:
            self._average()
            for group in groups:
                params = group["params"]
                slowmo(
                    params,
                    [self.state[p]["anchor"] for p in params],
                    [self.state[p]["slow_buffer"] for p in params],
                    lr=group["lr"],
                    slow_momentum=group["slow_momentum"],
                    slow_lr=group["slow_lr"],
                    foreach=group.get("foreach"),
                )
        return loss

    def _average(self) -> None:
        """Replace every parameter and the base's momentum buffers by their mean over ranks."""
        params = [p for group in self.param_groups for p in group["params"]]
        buffers = [
            value
            for p in params
            for value in self.base_optimizer.state[p].values()
            if isinstance(value, Tensor) and value.shape == p.shape
        ]
        self._average_gossip().mix_(params + buffers, 0)
