"""Gradient transforms that compose into optimizers (optax style).

Each transform is written once per execution path: a single-tensor function (also
what a compiled step traces; its hyperparameters may be floats or 0-dim tensors) and a
multi-tensor ``torch._foreach_*`` function. Optimizers and wrappers call these instead
of repeating the math: LAMB is the Adam direction plus weight decay scaled by a trust
ratio, ALTO the same fed by E (see :mod:`largebatch.optim._layerwise_adam`), and the
E adaptor feeds E to any optimizer.

**E** (Zhao et al., NeurIPS 2025, "Exploring landscapes for better minima along
valleys") feeds the optimizer ``g_k + alpha * a_k``, where ``a_k`` is an EMA (factor
``beta1``) of gradient differences ``g_k - g_{k-1}`` with ``a_0 = g_0 = 0``. Unrolling
that recursion leaves a single buffer ``mu``, the plain EMA of the raw gradients::

    c      = alpha * (1 - beta1)                        # |c| <= 1 <=> |alpha| <= 1/(1 - beta1)
    ghat_k = (1 + c) g_k - c mu_{k-1} = lerp(mu_{k-1}, g_k, 1 + c)
    mu_k   = lerp(mu_{k-1}, g_k, 1 - beta1)             # mu_0 = 0

For ``alpha < 0`` the fed gradient is a convex blend of ``g_k`` and the long-memory
average ``mu``; for ``alpha > 0`` it extrapolates ``g_k`` away from ``mu`` (an
optimistic gradient).

**Adam's direction** (Kingma & Ba 2015, with LAMB's decoupled weight decay term)::

    m = beta1 m + (1 - beta1) g                 v = beta2 v + (1 - beta2) g^2
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w

computed as ``scale * m / (sqrt(v) + eps_hat) + weight_decay * w`` with the bias
corrections of step ``t`` folded into two per-tensor scalars (:func:`adam_direction_scalars`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from largebatch.optim._compiled import scalar_dtype

# --- E ---------------------------------------------------------------------------------


def extrapolation_coefficient(alpha: float | Tensor, beta1: float | Tensor) -> float | Tensor:
    """``c = alpha * (1 - beta1)``: the weight of ``g_k - mu_{k-1}`` added to ``g_k``."""
    return alpha * (1.0 - beta1)


def check_e_hyperparameters(alpha: float, beta1: float) -> None:
    """Raise ``ValueError`` unless ``beta1`` is in [0, 1) and ``|alpha| <= 1 / (1 - beta1)``.

    The bound is the paper's stability condition (Remark 2.2), ``|c| < 1``, closed
    at ``|c| = 1`` so that ``c = 1`` (``alpha=1, beta1=0``: Popov's extrapolation
    from the past, the optimistic gradient) stays expressible.
    """
    if not (isinstance(beta1, int | float) and 0.0 <= beta1 < 1.0):
        raise ValueError(f"Invalid beta1 (E adaptor): {beta1}; must be in [0, 1)")
    bound = 1.0 / (1.0 - beta1)
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and abs(alpha) <= bound):
        raise ValueError(
            f"Invalid alpha (E adaptor): {alpha}; needs |alpha| <= 1/(1 - beta1) = {bound:g} "
            f"for beta1={beta1}"
        )


def e_gradient_(grad: Tensor, mu: Tensor, alpha: float | Tensor, beta1: float | Tensor) -> Tensor:
    """E on one tensor: return ``ghat`` (a new tensor) and advance ``mu`` in place.

    Written as ``ghat = g + c (g - mu)``, ``mu += (1 - beta1)(g - mu)`` rather than with
    ``lerp`` so that, compiled, the element-wise work is a few multiply-adds.
    """
    difference = grad - mu
    mu.add_((1.0 - beta1) * difference)
    return grad + extrapolation_coefficient(alpha, beta1) * difference


def e_gradients_(
    grads: Sequence[Tensor], mus: Sequence[Tensor], alpha: float, beta1: float
) -> list[Tensor]:
    """E on a list of tensors (``torch._foreach_*``): new ``ghat`` tensors; ``mus`` advance in place."""
    extrapolated = torch._foreach_lerp(mus, grads, 1.0 + extrapolation_coefficient(alpha, beta1))
    torch._foreach_lerp_(mus, grads, 1.0 - beta1)
    return list(extrapolated)


# --- Adam's direction ----------------------------------------------------------------------


def adam_direction_scalars(
    steps: Sequence[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Vectors of per-tensor ``scale, eps_hat`` with ``scale * m / (sqrt(v) + eps_hat) = m_hat / (sqrt(v_hat) + eps)``.

    ``scale = sqrt(1 - beta2^t) / (1 - beta1^t)`` and ``eps_hat = eps sqrt(1 - beta2^t)``
    (1 and ``eps`` without bias correction), computed once for a group on its stacked
    step counts (on device), so no path evaluates ``beta ** t`` per element.
    """
    step = torch.stack(list(steps)).to(scalar_dtype(dtype))
    if bias_correction:
        bias_correction2_sqrt = (1.0 - beta2**step).sqrt()
        scale = bias_correction2_sqrt / (1.0 - beta1**step)
        eps_hat = eps * bias_correction2_sqrt
    else:
        scale = torch.ones_like(step)
        eps_hat = torch.full_like(step, eps)
    return scale, eps_hat


def adam_moments_(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
) -> None:
    """Advance Adam's moments of one tensor in place (multiply-adds, for compiled steps)."""
    exp_avg.mul_(beta1).add_((1.0 - beta1) * grad)
    exp_avg_sq.mul_(beta2).add_((1.0 - beta2) * grad.square())


def adam_moments_multi_(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    beta1: float,
    beta2: float,
) -> None:
    """Advance Adam's moments of many tensors in place (``torch._foreach_*``)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)


def adam_direction(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: float | Tensor,
    eps_hat: float | Tensor,
    weight_decay: float | Tensor,
) -> Tensor:
    """``r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` of one tensor (a new tensor)."""
    return scale * exp_avg / (exp_avg_sq.sqrt() + eps_hat) + weight_decay * param


def adam_directions(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    scales: Sequence[Tensor],
    eps_hats: Sequence[Tensor],
    weight_decay: float,
    *,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """``r`` of many tensors (``torch._foreach_*``), built in one new tensor each or in ``out``."""
    if out is None:
        updates = list(torch._foreach_sqrt(exp_avg_sqs))
    else:
        updates = list(out)
        torch._foreach_copy_(updates, exp_avg_sqs)
        torch._foreach_sqrt_(updates)
    torch._foreach_add_(updates, list(eps_hats))
    torch._foreach_reciprocal_(updates)
    torch._foreach_mul_(updates, exp_avgs)
    torch._foreach_mul_(updates, list(scales))
    if weight_decay != 0.0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    return updates
