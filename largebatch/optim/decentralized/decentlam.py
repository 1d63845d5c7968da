"""DecentLaM: decentralized momentum SGD without the momentum-incurred bias (Yuan et al., ICCV 2021).

Rank ``i`` sends ``h_i = x_i - lr g_i`` (``g_i``: its local gradient plus
``weight_decay * x_i``), and turns what comes back into a corrected gradient that
carries the consensus step::

    g^_i = (x_i - sum_j w_ij h_j) / lr
    m_i  <- momentum m_i + g^_i
    x_i  <- x_i - lr (m_i, or g^_i + momentum m_i with Nesterov)

Only ``h`` is sent (one round, the bytes of one model) and the momentum stays local.
Written as a heavy-ball recursion (constant ``lr``, no Nesterov) this is
``x^{k+1} = W (x^k - lr g^k) + momentum (x^k - x^{k-1})``: a DSGD step plus momentum on
the local iterates. Its fixed point is DSGD's at step ``lr``, where DmSGD's is DSGD's at
``lr / (1 - momentum)``: the inconsistency bias of DmSGD, which grows with the step,
is ``1 / (1 - momentum)`` times larger (docs/decentralized.md).

The update divides by the learning rate, which must stay > 0. Weight decay is folded
into the gradient before ``h`` is formed, as in the public implementations we read;
Nesterov is ``torch.optim.SGD``'s, applied to ``g^``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.decentralized.base import (
    DecentralizedOptimizer,
    Finish,
    Prepare,
    momentum_step_,
)
from largebatch.optim.decentralized.topology import Topology


def decentlam_prepare(
    params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], *, lr, weight_decay, **_
) -> list[Tensor]:
    """``h_i = x_i - lr (g_i + weight_decay x_i)``: what rank ``i`` sends (new tensors)."""
    outgoing = list(torch._foreach_mul(params, 1.0 - lr * weight_decay))
    torch._foreach_add_(outgoing, grads, alpha=-lr)
    return outgoing


def decentlam_finish(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    mixed: list[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    foreach: bool | None,
    **_,
) -> None:
    """The momentum step along ``(x_i - sum_j w_ij h_j) / lr``; ``mixed`` holds the averaged
    ``h`` and is overwritten with that direction."""
    corrected = mixed
    torch._foreach_sub_(corrected, params)
    torch._foreach_div_(corrected, -lr)
    momentum_step_(
        params, corrected, buffers, lr=lr, momentum=momentum, nesterov=nesterov, foreach=foreach
    )


def decentlam(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    mix: Callable[[list[Tensor]], None],
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    foreach: bool | None = None,
) -> None:
    """One DecentLaM step of this rank, in place; ``mix`` averages a list of tensors in place."""
    outgoing = decentlam_prepare(params, grads, momentum_buffers, lr=lr, weight_decay=weight_decay)
    mix(outgoing)
    decentlam_finish(
        params, grads, momentum_buffers, outgoing,
        lr=lr, momentum=momentum, nesterov=nesterov, foreach=foreach,
    )  # fmt: skip


class DecentLaM(DecentralizedOptimizer):
    """DecentLaM (see the module docstring).

    Args:
        params: parameters or parameter groups.
        lr: learning rate, > 0 (the update divides by it).
        momentum: heavy-ball factor in [0, 1).
        weight_decay: L2 factor added to the gradient before ``h`` is formed.
        nesterov: step along ``g^ + momentum * m`` instead of ``m``.
        topology: a name of :data:`~largebatch.optim.decentralized.topology.TOPOLOGIES`
            or a :class:`Topology`; the ring by default, as on the directed exponential
            graphs (``exp``, ``one-peer-exp``) the update is unstable at momentum 0.9.
        process_group: the ranks that gossip (default: all).
        foreach: ``torch.optim.SGD``'s switch for the local step (``None``: its default).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        topology: str | Topology = "ring",
        process_group: Any = None,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, foreach=foreach
        )
        super().__init__(params, defaults, topology, process_group)

    def _divides_by_lr(self, group: dict[str, Any]) -> bool:
        return True

    def _check_topology(self, topology: Topology) -> None:
        """Warn when a group's momentum makes the heavy-ball gossip unstable on ``topology``."""
        for momentum in sorted({group["momentum"] for group in self.param_groups}):
            rate = topology.heavy_ball_rate(momentum)
            if rate > 1.0:
                warnings.warn(
                    f"DecentLaM with momentum {momentum} on topology {topology.name!r} "
                    f"with {topology.world_size} processes is unstable: the ranks' "
                    f"disagreement grows by {rate:.3f} per step whatever the learning rate "
                    f"(momentum below {topology.largest_stable_momentum():.2f} is stable "
                    "there); use topology 'ring' or a smaller momentum "
                    "(docs/decentralized.md, 'DecentLaM needs a graph with real eigenvalues')",
                    UserWarning,
                    stacklevel=3,
                )

    def _phases(self, group: dict[str, Any]) -> tuple[Prepare, Finish]:
        return decentlam_prepare, decentlam_finish
