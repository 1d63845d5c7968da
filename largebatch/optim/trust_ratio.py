"""Layer-wise trust ratios shared by LARS, LAMB and ALTO.

A trust ratio rescales one parameter tensor's update by the ratio of the
parameter's norm to the update's norm, so every layer moves by a similar
*relative* amount whatever its gradient scale (You et al. 2017, 2019).

Every function here is element-wise in its norm arguments: pass 0-dim tensors
(one parameter, single-tensor path) or the stacked vector that :func:`norms`
returns (a whole group, multi-tensor and compiled paths). Each formula is thus
written once and runs on the parameters' device, with ``torch.where`` in place
of Python branches, so nothing synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_BLAS_DTYPES = (torch.float32, torch.float64)


def norms(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of each tensor, stacked into one vector.

    On CPU (float32/float64) each norm is ``sqrt(dot(t, t))``: BLAS reduces with
    several independent accumulators, faster than ``_foreach_norm``, which on CPU
    loops over ATen's norm kernel (figures in ``docs/optimizers.md``). Elsewhere, one
    ``_foreach_norm`` (a single multi-tensor kernel on GPU).
    """
    tensors = list(tensors)
    if all(t.device.type == "cpu" and t.dtype in _BLAS_DTYPES for t in tensors):
        flat = [t.reshape(-1) for t in tensors]
        return torch.stack([torch.dot(f, f) for f in flat]).sqrt()
    return torch.stack(torch._foreach_norm(tensors))


def one_where_zero(ratio: Tensor, *norm_values: Tensor) -> Tensor:
    """``ratio``, or 1 wherever any of ``norm_values`` is zero.

    A zero parameter norm (fresh zero-initialised layer) or a zero update norm
    would give a ratio of 0 or a division by zero; the layer then takes the
    plain, unscaled step instead.
    """
    all_positive = norm_values[0] > 0
    for value in norm_values[1:]:
        all_positive = all_positive & (value > 0)
    return torch.where(all_positive, ratio, torch.ones_like(ratio))


def lars_trust_ratio(
    param_norm: Tensor,
    grad_norm: Tensor,
    *,
    trust_coef: float | Tensor,
    weight_decay: float | Tensor,
    eps: float | Tensor = 0.0,
    clip_lr: float | Tensor | None = None,
) -> Tensor:
    """LARS local learning rate ``trust_coef * ||w|| / (||g|| + wd * ||w|| + eps)``.

    With ``clip_lr`` (LARC "clip" mode, NVIDIA apex) the ratio becomes
    ``min(ratio / lr, 1)``, so the effective step ``lr * ratio`` never exceeds
    the global learning rate. The ratio is 1 where either norm is zero.
    """
    ratio = trust_coef * param_norm / (grad_norm + weight_decay * param_norm + eps)
    if clip_lr is not None:
        ratio = torch.clamp(ratio / clip_lr, max=1.0)
    return one_where_zero(ratio, param_norm, grad_norm)


def lamb_trust_ratio(
    param_norm: Tensor,
    update_norm: Tensor,
    *,
    norm_min: float | None = None,
    norm_max: float | None = None,
    ratio_min: float | None = None,
    ratio_max: float | None = None,
) -> Tensor:
    """LAMB ratio ``phi(||w||) / ||r||``, phi clamping ``||w||`` to ``[norm_min, norm_max]``.

    ``None`` bounds leave that side unclamped (phi is the identity when both are
    ``None``). The ratio itself is then clamped to ``[ratio_min, ratio_max]`` (as the
    large-batch PPO recipe of Shacklett et al. 2021 does). The ratio is 1 where
    either norm is zero.
    """
    scaled_norm = param_norm
    if norm_min is not None or norm_max is not None:
        scaled_norm = torch.clamp(param_norm, min=norm_min, max=norm_max)
    ratio = scaled_norm / update_norm
    if ratio_min is not None or ratio_max is not None:
        ratio = torch.clamp(ratio, min=ratio_min, max=ratio_max)
    return one_where_zero(ratio, param_norm, update_norm)


def alto_trust_ratio(
    param_norm: Tensor,
    update_norm: Tensor,
    *,
    eps2: float | Tensor,
    eps3: float | Tensor,
) -> Tensor:
    """ALTO's (paper, Alg. 2) ratio ``phi(||w||) / (||r|| + eps2 * phi(||w||))``, ``phi(x) = x + eps3``.

    The ratio is 1 where either norm is zero, as LAMB's and the reference code's: with
    ``phi(0) = eps3`` the paper's form would be about ``eps3 / ||r||`` for a
    zero-initialised tensor (a bias, a norm shift), which would then never move.
    """
    phi = param_norm + eps3
    return one_where_zero(phi / (update_norm + eps2 * phi), param_norm, update_norm)


def scale_by_ratio_(updates: Sequence[Tensor], ratios: Tensor) -> None:
    """Multiply each update in place by its entry of ``ratios`` (a vector from the helpers above)."""
    torch._foreach_mul_(list(updates), list(ratios.unbind()))


def group_uses_trust_ratio(group: dict) -> bool:
    """The per-group ``trust_ratio`` switch (absent means on); off means a ratio of 1."""
    return bool(group.get("trust_ratio", True))
