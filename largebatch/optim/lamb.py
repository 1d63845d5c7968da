"""LAMB: Adam moments with a layer-wise trust ratio (You et al. 2019, ICLR 2020, Alg. 2).

Per parameter tensor ``w`` (a "layer") with gradient ``g`` at step ``t``::

    m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t)              v_hat = v / (1 - beta2^t)      # bias_correction
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
    w = w - lr * phi(||w||) / ||r|| * r    # ratio 1 where ||w|| or ||r|| is 0

``phi`` clamps ``||w||`` to ``weight_norm_clamp = (low, high)`` (identity when
``None``). A group with ``trust_ratio=False`` (biases, norm weights) takes the
plain step ``lr * r``.

All paths compute ``r`` as ``scale * m / (sqrt(v) + eps_hat)`` with per-tensor
``scale = sqrt(1 - beta2^t) / (1 - beta1^t)`` and ``eps_hat = eps sqrt(1 - beta2^t)``
(:func:`adam_direction_scalars`), the same quantity with the bias corrections
folded into two scalars per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from largebatch.optim._base import (
    LayerwiseOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
    path_of,
    run_step,
)
from largebatch.optim._compiled import CompiledStep, scalar_dtype
from largebatch.optim.trust_ratio import (
    group_uses_trust_ratio,
    lamb_trust_ratio,
    norms,
    scale_by_ratio_,
)


def adam_direction_scalars(
    steps: Sequence[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction: bool,
    dtype: torch.dtype,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Per-tensor ``(scale, eps_hat)`` with ``scale * m / (sqrt(v) + eps_hat) = m_hat / (sqrt(v_hat) + eps)``.

    Computed once for a group on its stacked step counts (on device), so no path
    evaluates ``beta ** t`` per element.
    """
    step = torch.stack(list(steps)).to(scalar_dtype(dtype))
    if bias_correction:
        bias_correction2_sqrt = (1.0 - beta2**step).sqrt()
        scale = bias_correction2_sqrt / (1.0 - beta1**step)
        eps_hat = eps * bias_correction2_sqrt
    else:
        scale = torch.ones_like(step)
        eps_hat = torch.full_like(step, eps)
    return scale.unbind(), eps_hat.unbind()


def _lamb_direction(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor,
    eps_hat: Tensor,
    weight_decay: float | Tensor,
) -> Tensor:
    """``r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` of one tensor."""
    return scale * exp_avg / (exp_avg_sq.sqrt() + eps_hat) + weight_decay * param


def lamb_tensor_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor,
    eps_hat: Tensor,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    weight_decay: float | Tensor,
    weight_norm_clamp: tuple[float, float] | None,
    trust_ratio: bool,
) -> float | Tensor:
    """LAMB on one tensor: advance the moments, overwrite ``grad`` with ``r``, return ``-lr * ratio``.

    The caller applies ``param += coefficient * r`` (single-tensor and compiled paths,
    see :class:`~largebatch.optim._compiled.CompiledStep`).
    """
    exp_avg.mul_(beta1).add_((1.0 - beta1) * grad)
    exp_avg_sq.mul_(beta2).add_((1.0 - beta2) * grad.square())
    grad.copy_(_lamb_direction(param, exp_avg, exp_avg_sq, scale, eps_hat, weight_decay))
    if not trust_ratio:
        return -lr
    ratio = lamb_trust_ratio(
        torch.linalg.vector_norm(param),
        torch.linalg.vector_norm(grad),
        **_clamp_bounds(weight_norm_clamp),
    )
    return -lr * ratio


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scales: Sequence[Tensor],
    eps_hats: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    weight_norm_clamp: tuple[float, float] | None,
    trust_ratio: bool,
) -> None:
    """LAMB update of many tensors (one device and dtype) with ``torch._foreach_*`` ops.

    ``r`` is built in one temporary per tensor (no second allocation for the quotient).
    """
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    updates = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(updates, list(eps_hats))
    torch._foreach_reciprocal_(updates)
    torch._foreach_mul_(updates, exp_avgs)
    torch._foreach_mul_(updates, list(scales))
    if weight_decay != 0.0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    if trust_ratio:
        ratios = lamb_trust_ratio(norms(params), norms(updates), **_clamp_bounds(weight_norm_clamp))
        scale_by_ratio_(updates, ratios)
    torch._foreach_add_(params, updates, alpha=-lr)


def _clamp_bounds(weight_norm_clamp: tuple[float, float] | None) -> dict[str, float | None]:
    """``lamb_trust_ratio`` keyword arguments for ``phi``."""
    low, high = weight_norm_clamp if weight_norm_clamp is not None else (None, None)
    return {"norm_min": low, "norm_max": high}


_COMPILED_LAMB = CompiledStep(lamb_tensor_step_, direction_into_grad=True)


class LAMB(LayerwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019).

    Args:
        params: parameters or parameter groups. A group may set ``trust_ratio=False``
            (biases, norm weights) to take the plain Adam-style step ``lr * r``.
        lr: learning rate.
        betas: ``(beta1, beta2)``, decay of the first and second moments, in [0, 1).
        eps: added to ``sqrt(v_hat)``.
        weight_decay: ``lambda``, added to the update before the trust ratio.
        bias_correction: divide the moments by ``1 - beta^t`` (Alg. 2); ``False``
            gives the paper's v3 form without it (as pytorch-optimizer's ``Lamb``).
        weight_norm_clamp: ``(low, high)`` bounds of ``phi(||w||)``; ``None`` for no clamp.
        trust_ratio: default of the per-group switch.
        foreach: ``False`` runs the single-tensor loop; ``None``/``True`` the
            multi-tensor path.
        compiled: run a ``torch.compile``'d step (one fused memory pass per tensor for
            the moments, ``r`` and the norms, then one for the parameters; fastest on
            CPU). It uses ``p.grad`` as scratch: after ``step()`` it holds ``r``. The
            first step compiles: tens of seconds cold, a few seconds once inductor's
            on-disk cache holds the (shape-generic) graphs.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        weight_norm_clamp: tuple[float, float] | None = None,
        *,
        trust_ratio: bool = True,
        foreach: bool | None = None,
        compiled: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            weight_norm_clamp=None if weight_norm_clamp is None else tuple(weight_norm_clamp),
            trust_ratio=trust_ratio,
            foreach=foreach,
            compiled=compiled,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], 2)
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        clamp = group["weight_norm_clamp"]
        if clamp is not None and not (len(clamp) == 2 and 0.0 <= clamp[0] <= clamp[1]):
            raise ValueError(f"Invalid weight_norm_clamp value: {clamp}; expected 0 <= low <= high")
        path_of(group["foreach"], group["compiled"])

    def _step_group(self, group: dict[str, Any]) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        hyperparameters = {
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "weight_decay": group["weight_decay"],
        }
        options = {
            "weight_norm_clamp": group["weight_norm_clamp"],
            "trust_ratio": group_uses_trust_ratio(group),
        }
        grouped = self._group_tensors_by_device_and_dtype(
            [
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
            ]
        )
        for (device_params, grads, exp_avgs, exp_avg_sqs, steps), _ in grouped.values():
            torch._foreach_add_(steps, 1.0)
            scalar_lists = adam_direction_scalars(
                steps,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                bias_correction=group["bias_correction"],
                dtype=device_params[0].dtype,
            )
            run_step(
                path_of(group["foreach"], group["compiled"]),
                tensor_step=lamb_tensor_step_,
                multi_tensor_step=_multi_tensor_lamb,
                compiled_step=_COMPILED_LAMB,
                tensor_lists=[device_params, grads, exp_avgs, exp_avg_sqs],
                scalar_lists=scalar_lists,
                hyperparameters=hyperparameters,
                options=options,
            )
