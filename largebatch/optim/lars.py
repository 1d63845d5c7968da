"""LARS: momentum SGD with a layer-wise trust ratio (You, Gitman & Ginsburg 2017).

Per parameter tensor ``w`` (a "layer") with gradient ``g``::

    ratio = trust_coef * ||w|| / (||g|| + weight_decay * ||w|| + eps)   # 1 if a norm is 0
    ratio = min(ratio / lr, 1)                                          # only with clip (LARC)
    u     = ratio * (g + weight_decay * w)
    buf   = momentum * buf + u
    w     = w - lr * (u + momentum * buf if nesterov else buf)

The learning rate multiplies the momentum buffer (``torch.optim.SGD``'s
convention, as in timm, optax and pytorch-optimizer) rather than entering it as
in the paper's Algorithm 1; the two agree while the learning rate is constant.
A group with ``trust_ratio=False`` (biases, norm weights) takes plain momentum
SGD steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import (
    LayerwiseOptimizer,
    check_lr,
    check_non_negative,
    path_of,
    run_step,
)
from largebatch.optim._compiled import CompiledStep
from largebatch.optim.trust_ratio import group_uses_trust_ratio, lars_trust_ratio, norms


def lars_tensor_step_(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    ratio: Tensor | None = None,
    *,
    lr: float | Tensor,
    momentum: float | Tensor,
    weight_decay: float | Tensor,
    nesterov: bool,
) -> None:
    """LARS update of one parameter tensor in place, given its trust ratio (single-tensor and compiled paths).

    ``ratio`` is ``None`` for a group without trust ratio (plain momentum SGD).
    """
    update = grad + weight_decay * param
    if ratio is not None:
        update = update * ratio
    momentum_buffer.mul_(momentum).add_(update)
    step = update + momentum * momentum_buffer if nesterov else momentum_buffer
    param.sub_(lr * step)


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    ratios: Sequence[Tensor] | None = None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    """LARS update of many tensors (one device and dtype) with ``torch._foreach_*`` ops."""
    updates = torch._foreach_add(grads, params, alpha=weight_decay)
    if ratios is not None:
        torch._foreach_mul_(updates, list(ratios))
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, updates)
    if nesterov:
        torch._foreach_add_(updates, momentum_buffers, alpha=momentum)
    else:
        updates = momentum_buffers
    torch._foreach_add_(params, updates, alpha=-lr)


_COMPILED_LARS = CompiledStep(lars_tensor_step_)


class LARS(LayerwiseOptimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), optionally LARC-clipped.

    Args:
        params: parameters or parameter groups. A group may set ``trust_ratio=False``
            (biases, norm weights) to take plain momentum-SGD steps.
        lr: global learning rate. Large-batch recipes use values around 1-30
            because the trust ratio (``~trust_coef``) scales it down.
        momentum: heavy-ball momentum factor in [0, 1).
        weight_decay: L2 coefficient, added to the gradient before the ratio.
        trust_coef: ``eta`` of the paper: the trust ratio is ``eta ||w|| / ||g||``.
        eps: added to the ratio's denominator.
        nesterov: Nesterov momentum.
        clip: LARC "clip" mode: the ratio becomes ``min(ratio / lr, 1)`` so no layer's
            rate exceeds ``lr``.
        trust_ratio: default of the per-group switch.
        foreach: ``False`` runs the single-tensor loop; ``None``/``True`` the
            multi-tensor path.
        compiled: run a ``torch.compile``'d step (the group's norms and trust ratios,
            then one fused memory pass per tensor; fastest on CPU). The first step
            compiles: tens of seconds cold, a few seconds once inductor's on-disk
            cache holds the (shape-generic) graphs.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coef: float = 1e-3,
        eps: float = 0.0,
        nesterov: bool = False,
        clip: bool = False,
        *,
        trust_ratio: bool = True,
        foreach: bool | None = None,
        compiled: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coef=trust_coef,
            eps=eps,
            nesterov=nesterov,
            clip=clip,
            trust_ratio=trust_ratio,
            foreach=foreach,
            compiled=compiled,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        check_lr(group["lr"])
        if not (isinstance(group["momentum"], int | float) and 0.0 <= group["momentum"] < 1.0):
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        for name in ("weight_decay", "trust_coef", "eps"):
            check_non_negative(name, group[name])
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("Nesterov momentum requires a momentum > 0")
        path_of(group["foreach"], group["compiled"])

    def _step_group(self, group: dict[str, Any]) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        buffers = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        hyperparameters = {name: group[name] for name in ("lr", "momentum", "weight_decay")}
        grouped = self._group_tensors_by_device_and_dtype(
            [params, [p.grad for p in params], buffers]
        )
        for tensor_lists, _ in grouped.values():
            scalar_lists: tuple[Sequence[Tensor], ...] = ()
            if group_uses_trust_ratio(group):
                ratios = lars_trust_ratio(
                    norms(tensor_lists[0]),
                    norms(tensor_lists[1]),
                    trust_coef=group["trust_coef"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    clip_lr=group["lr"] if group["clip"] else None,
                )
                scalar_lists = (ratios.unbind(),)
            run_step(
                path_of(group["foreach"], group["compiled"]),
                tensor_step=lars_tensor_step_,
                multi_tensor_step=_multi_tensor_lars,
                compiled_step=_COMPILED_LARS,
                tensor_lists=tensor_lists,
                scalar_lists=scalar_lists,
                hyperparameters=hyperparameters,
                options={"nesterov": group["nesterov"]},
            )
