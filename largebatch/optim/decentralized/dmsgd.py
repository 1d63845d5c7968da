"""DmSGD: decentralized momentum SGD, in the four forms the decentralized literature compares.

Rank ``i`` holds its own parameters ``x_i`` and momentum ``m_i``; ``g_i`` is its local
gradient plus ``weight_decay * x_i`` (an L2 term, as ``torch.optim.SGD``); ``W`` is the
topology's mixing matrix (``sum_j w_ij`` below); ``d_i = m_i`` or, with Nesterov,
``g_i + momentum * m_i``. One gossip round per step:

* ``atc`` (adapt then combine; the DmSGD of DecentLaM's paper, Lian et al.'s D-PSGD with
  momentum)::

      m_i <- momentum m_i + g_i ;  x_i <- sum_j w_ij (x_j - lr d_j)

* ``awc`` (adapt while combining; Assran et al. 2019): the parameters are sent before the
  local step, so the exchange can overlap the backward pass::

      m_i <- momentum m_i + g_i ;  x_i <- sum_j w_ij x_j - lr d_i

* ``da`` (momentum averaged too; Yu, Jin & Yang 2019): twice the bytes per round::

      m_i <- momentum sum_j w_ij m_j + g_i ;  x_i <- sum_j w_ij x_j - lr d_i

* ``qg`` (quasi-global momentum; Lin, Karimireddy, Stich & Jaggi 2021): the momentum
  follows the averaged iterates' displacement rather than the local gradient::

      u_i = momentum m_i + g_i ;  x_i' <- sum_j w_ij (x_j - lr d_j(u_j)) ;
      m_i <- momentum m_i + (1 - momentum) (x_i - x_i') / lr ;  x_i <- x_i'

Each form is a ``prepare`` (what rank ``i`` sends) and a ``finish`` (its update from the
averaged tensors); :func:`dmsgd` runs both around any ``mix`` function, :class:`DmSGD`
around one gossip round for all parameter groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from largebatch.optim.decentralized.base import (
    DecentralizedOptimizer,
    Finish,
    Prepare,
    decayed,
    momentum_step_,
)
from largebatch.optim.decentralized.topology import Topology


def _atc_prepare(params, grads, buffers, **step) -> list[Tensor]:
    momentum_step_(params, grads, buffers, **step)
    return params  # averaged in place


def _atc_finish(params, grads, buffers, mixed, **settings) -> None:
    pass


def _awc_prepare(params, grads, buffers, **settings) -> list[Tensor]:
    return [p.clone() for p in params]  # the decay below is taken at x_i


def _awc_finish(params, grads, buffers, mixed, *, weight_decay, **step) -> None:
    directions = decayed(params, grads, weight_decay)  # at x_i, before it is replaced
    torch._foreach_copy_(params, mixed)
    momentum_step_(params, directions, buffers, **step)


def _da_prepare(params, grads, buffers, **settings) -> list[Tensor]:
    return [p.clone() for p in params] + list(buffers)  # momentum averaged in place


def _da_finish(params, grads, buffers, mixed, *, weight_decay, **step) -> None:
    _awc_finish(params, grads, buffers, mixed[: len(params)], weight_decay=weight_decay, **step)


def _qg_prepare(params, grads, buffers, **step) -> list[Tensor]:
    half_steps = [p.clone() for p in params]
    local_momentum = [m.clone() for m in buffers]
    momentum_step_(half_steps, grads, local_momentum, **step)
    return half_steps


def _qg_finish(params, grads, buffers, mixed, *, lr, momentum, **settings) -> None:
    displacement = torch._foreach_sub(params, mixed)  # x_i - x_i'
    torch._foreach_div_(displacement, lr)
    torch._foreach_lerp_(buffers, displacement, 1.0 - momentum)
    torch._foreach_copy_(params, mixed)


VARIANTS: dict[str, tuple[Prepare, Finish]] = {
    "atc": (_atc_prepare, _atc_finish),
    "awc": (_awc_prepare, _awc_finish),
    "da": (_da_prepare, _da_finish),
    "qg": (_qg_prepare, _qg_finish),
}


def dmsgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    mix: Callable[[list[Tensor]], None],
    variant: str = "atc",
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    foreach: bool | None = None,
) -> None:
    """One DmSGD step of this rank, in place; ``mix`` averages a list of tensors in place.

    ``mix`` is, for instance, ``partial(Gossip(...).mix_, step=k)``, or a simulation of
    several ranks in one process.
    """
    prepare, finish = VARIANTS[variant]
    settings = dict(
        lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, foreach=foreach
    )
    outgoing = prepare(params, grads, momentum_buffers, **settings)
    mix(outgoing)
    finish(params, grads, momentum_buffers, outgoing, **settings)


class DmSGD(DecentralizedOptimizer):
    """Decentralized momentum SGD (see the module docstring for the four ``variant`` s).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0 for ``variant="qg"``, which divides by it).
        momentum: heavy-ball factor in [0, 1).
        weight_decay: L2 factor added to the gradient before anything is sent.
        nesterov: step along ``g + momentum * m`` instead of ``m``.
        variant: ``"atc"``, ``"awc"``, ``"da"`` or ``"qg"``.
        topology: a name of :data:`~largebatch.optim.decentralized.topology.TOPOLOGIES`
            or a :class:`Topology`.
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
        variant: str = "atc",
        *,
        topology: str | Topology = "exp",
        process_group: Any = None,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            variant=variant,
            foreach=foreach,
        )
        super().__init__(params, defaults, topology, process_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        if group["variant"] not in VARIANTS:
            raise ValueError(
                f"Invalid variant: {group['variant']!r} (choose from {', '.join(VARIANTS)})"
            )
        super()._check_group(group)

    def _divides_by_lr(self, group: dict[str, Any]) -> bool:
        return group["variant"] == "qg"

    def _phases(self, group: dict[str, Any]) -> tuple[Prepare, Finish]:
        return VARIANTS[group["variant"]]

    def _extra_mixed(self, group: dict[str, Any], idle: list[Tensor]) -> list[Tensor]:
        if group["variant"] == "da":  # the momentum of every parameter is averaged
            return idle + [self.state[p]["momentum_buffer"] for p in idle]
        return idle
