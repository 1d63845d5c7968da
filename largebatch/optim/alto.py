"""ALTO (Zhao et al., NeurIPS 2025, Alg. 2): LAMB with the E adaptor fused in.

Per parameter tensor ``w`` (a "layer") with gradient ``g`` at step ``t``; ``ghat`` is
the E-transformed gradient of :mod:`largebatch.optim.transforms`::

    ghat = lerp(mu, g, 1 + alpha (1 - beta1));   mu = lerp(mu, g, 1 - beta1)
    m = beta2 m + (1 - beta2) ghat;              v = beta3 v + (1 - beta3) ghat^2
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w       # m_hat, v_hat bias-corrected
    w = w - lr * phi(||w||) / (||r|| + eps2 phi(||w||)) * r,  phi(x) = x + eps3

A group with ``trust_ratio=False`` (biases, norm weights) takes the plain step
``lr * r``. This follows the paper, not the reference code
(``e-optimizer-adaptor`` 0.1.0), which also clips the global gradient norm to 1
inside ``step``, uses ``||w|| / ||r||`` and skips the ratio wherever weight decay
is 0; clipping in the training loop, ``eps2 = eps3 = 0`` and ``trust_ratio=False``
on the zero-decay group reproduce it (see ``tests/optim/test_alto.py``).

The three execution paths (single-tensor, multi-tensor, compiled) and the
bias-corrected Adam direction are LAMB's (:mod:`largebatch.optim.lamb`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
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
from largebatch.optim._compiled import CompiledStep
from largebatch.optim.lamb import _lamb_direction, adam_direction_scalars
from largebatch.optim.transforms import check_e_hyperparameters, e_gradient_, e_gradients_
from largebatch.optim.trust_ratio import (
    alto_trust_ratio,
    group_uses_trust_ratio,
    norms,
    scale_by_ratio_,
)

STATE_KEYS = ("grad_ema", "exp_avg", "exp_avg_sq")
"""Per-parameter buffers besides the step count: E's gradient EMA and Adam's moments."""


def alto_tensor_step_(
    param: Tensor,
    grad: Tensor,
    grad_ema: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor,
    eps_hat: Tensor,
    *,
    lr: float | Tensor,
    alpha: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    beta3: float | Tensor,
    weight_decay: float | Tensor,
    eps2: float | Tensor,
    eps3: float | Tensor,
    trust_ratio: bool,
) -> float | Tensor:
    """ALTO on one tensor: advance E and the moments, overwrite ``grad`` with ``r``, return ``-lr * ratio``.

    ``scale`` and ``eps_hat`` fold the bias corrections of step ``t`` into two
    scalars (:func:`~largebatch.optim.lamb.adam_direction_scalars`). The caller
    applies ``param += coefficient * r`` (single-tensor and compiled paths, see
    :class:`~largebatch.optim._compiled.CompiledStep`).
    """
    extrapolated = e_gradient_(grad, grad_ema, alpha, beta1)
    exp_avg.add_((1.0 - beta2) * (extrapolated - exp_avg))
    exp_avg_sq.add_((1.0 - beta3) * (extrapolated.square() - exp_avg_sq))
    grad.copy_(_lamb_direction(param, exp_avg, exp_avg_sq, scale, eps_hat, weight_decay))
    if not trust_ratio:
        return -lr
    ratio = alto_trust_ratio(
        torch.linalg.vector_norm(param), torch.linalg.vector_norm(grad), eps2=eps2, eps3=eps3
    )
    return -lr * ratio


def _multi_tensor_alto(
    params: list[Tensor],
    grads: list[Tensor],
    grad_emas: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scales: Sequence[Tensor],
    eps_hats: Sequence[Tensor],
    *,
    lr: float,
    alpha: float,
    beta1: float,
    beta2: float,
    beta3: float,
    weight_decay: float,
    eps2: float,
    eps3: float,
    trust_ratio: bool,
) -> None:
    """ALTO update of many tensors (one device and dtype) with ``torch._foreach_*`` ops."""
    extrapolated = e_gradients_(grads, grad_emas, alpha, beta1)
    torch._foreach_lerp_(exp_avgs, extrapolated, 1.0 - beta2)
    torch._foreach_mul_(exp_avg_sqs, beta3)
    torch._foreach_addcmul_(exp_avg_sqs, extrapolated, extrapolated, 1.0 - beta3)
    del extrapolated
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, list(eps_hats))
    updates = torch._foreach_div(exp_avgs, denominators)
    del denominators
    torch._foreach_mul_(updates, list(scales))
    if weight_decay != 0.0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    if trust_ratio:
        ratios = alto_trust_ratio(norms(params), norms(updates), eps2=eps2, eps3=eps3)
        scale_by_ratio_(updates, ratios)
    torch._foreach_add_(params, updates, alpha=-lr)


_COMPILED_ALTO = CompiledStep(alto_tensor_step_, direction_into_grad=True)


class ALTO(LayerwiseOptimizer):
    """LAMB fed E-transformed gradients, with bias correction and the paper's trust ratio.

    Args:
        params: parameters or parameter groups. A group may set ``trust_ratio=False``
            (biases, norm weights) to take the plain Adam-style step ``lr * r``.
        lr: learning rate.
        betas: ``(beta1, beta2, beta3)``: EMA factor of the gradient differences (E),
            of the first moment and of the second moment, each in [0, 1).
        alpha: E strength, ``|alpha| <= 1 / (1 - beta1)``: negative explores (large
            batches), positive exploits (small batches).
        weight_decay: ``lambda``, added to the update inside the trust ratio (LAMB style).
        eps: ``eps1``, added to ``sqrt(v_hat)``.
        eps2: trust-ratio denominator guard; caps the ratio near ``1 / eps2``.
        eps3: ``phi`` guard; keeps the ratio positive for a zero parameter.
        trust_ratio: default of the per-group layer-wise switch.
        foreach: ``False`` runs the single-tensor loop; ``None``/``True`` the
            multi-tensor path.
        compiled: run a ``torch.compile``'d step (one fused memory pass per tensor for
            E, the moments, ``r`` and the norms, then one for the parameters). It uses
            ``p.grad`` as scratch: after ``step()`` it holds ``r``. The first step
            compiles, about a minute on CPU, cached on disk afterwards.

    Defaults are the paper's large-batch (>= 1K) ones; ``ALTO(params, **ALTO.SMALL_BATCH)``
    gives its small-batch setting (``alpha=0.5, beta1=0.01``).
    """

    SMALL_BATCH = MappingProxyType({"alpha": 0.5, "betas": (0.01, 0.9, 0.99)})
    """The paper's setting for batches below 1K (Sec. 4): exploit with a short memory."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.99, 0.9, 0.99),
        alpha: float = -5.0,
        weight_decay: float = 1e-4,
        eps: float = 1e-6,
        eps2: float = 1e-6,
        eps3: float = 1e-10,
        *,
        trust_ratio: bool = True,
        foreach: bool | None = None,
        compiled: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            alpha=alpha,
            weight_decay=weight_decay,
            eps=eps,
            eps2=eps2,
            eps3=eps3,
            trust_ratio=trust_ratio,
            foreach=foreach,
            compiled=compiled,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], 3)
        check_e_hyperparameters(group["alpha"], group["betas"][0])
        for name in ("weight_decay", "eps", "eps2", "eps3"):
            check_non_negative(name, group[name])
        path_of(group["foreach"], group["compiled"])

    def _step_group(self, group: dict[str, Any]) -> None:
        params = self._params_with_grad(group)
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in STATE_KEYS:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2, beta3 = group["betas"]
        hyperparameters = {
            "lr": group["lr"],
            "alpha": group["alpha"],
            "beta1": beta1,
            "beta2": beta2,
            "beta3": beta3,
            "weight_decay": group["weight_decay"],
            "eps2": group["eps2"],
            "eps3": group["eps3"],
        }
        grouped = self._group_tensors_by_device_and_dtype(
            [params, [p.grad for p in params]]
            + [[s[key] for s in states] for key in STATE_KEYS]
            + [[s["step"] for s in states]]
        )
        for (*tensor_lists, steps), _ in grouped.values():
            torch._foreach_add_(steps, 1.0)
            scalar_lists = adam_direction_scalars(
                steps,
                beta1=beta2,
                beta2=beta3,
                eps=group["eps"],
                bias_correction=True,
                dtype=tensor_lists[0][0].dtype,
            )
            run_step(
                path_of(group["foreach"], group["compiled"]),
                tensor_step=alto_tensor_step_,
                multi_tensor_step=_multi_tensor_alto,
                compiled_step=_COMPILED_ALTO,
                tensor_lists=tensor_lists,
                scalar_lists=scalar_lists,
                hyperparameters=hyperparameters,
                options={"trust_ratio": group_uses_trust_ratio(group)},
            )
