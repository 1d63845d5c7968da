"""Gradient transforms that compose with any optimizer (optax style).

Each transform is written once per execution path: a single-tensor function
(also what a compiled step traces) and a multi-tensor ``torch._foreach_*``
function. Optimizers and wrappers call these instead of repeating the math.

**E** (Zhao et al., NeurIPS 2025, "Exploring landscapes for better minima along
valleys") feeds the optimizer ``g_k + alpha * a_k``, where ``a_k`` is an EMA
(factor ``beta1``) of gradient differences ``g_k - g_{k-1}`` with ``a_0 = g_0 = 0``.
Unrolling that recursion leaves a single buffer ``mu``, the plain EMA of the raw
gradients::

    c      = alpha * (1 - beta1)                        # |c| <= 1 <=> |alpha| <= 1/(1 - beta1)
    ghat_k = (1 + c) g_k - c mu_{k-1} = lerp(mu_{k-1}, g_k, 1 + c)
    mu_k   = lerp(mu_{k-1}, g_k, 1 - beta1)             # mu_0 = 0

For ``alpha < 0`` the fed gradient is a convex blend of ``g_k`` and the
long-memory average ``mu``; for ``alpha > 0`` it extrapolates ``g_k`` away from
``mu`` (an optimistic gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def extrapolation_coefficient(alpha: float | Tensor, beta1: float | Tensor) -> float | Tensor:
    """``c = alpha * (1 - beta1)``: the weight of ``g_k - mu_{k-1}`` added to ``g_k``."""
    return alpha * (1.0 - beta1)


def check_e_hyperparameters(alpha: float, beta1: float) -> None:
    """Raise ``ValueError`` unless ``beta1`` is in [0, 1) and ``|alpha| <= 1 / (1 - beta1)``.

    The bound is the paper's stability condition (Remark 2.2), ``|c| < 1``, closed
    at ``|c| = 1`` so that ``c = 1`` (``alpha=1, beta1=0``: Popov's extrapolation
    from the past, the optimistic gradient) stays expressible.
    """
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta1 (E adaptor): {beta1}; must be in [0, 1)")
    bound = 1.0 / (1.0 - beta1)
    if not (math.isfinite(alpha) and abs(alpha) <= bound):
        raise ValueError(
            f"Invalid alpha (E adaptor): {alpha}; needs |alpha| <= 1/(1 - beta1) = {bound:g} "
            f"for beta1={beta1}"
        )


def e_gradient_(grad: Tensor, mu: Tensor, alpha: float | Tensor, beta1: float | Tensor) -> Tensor:
    """E on one tensor: return ``ghat`` (a new tensor) and advance ``mu`` in place.

    Written as ``ghat = g + c (g - mu)``, ``mu += (1 - beta1)(g - mu)`` rather than with
    ``lerp`` so that, compiled, the element-wise work is a few multiply-adds; the
    hyperparameters may be floats or 0-dim tensors.
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
