"""The step LAMB and ALTO share: Adam's direction, scaled per tensor by a trust ratio.

optax composes LAMB as ``chain(scale_by_adam, add_decayed_weights,
scale_by_trust_ratio, scale_by_learning_rate)``; ALTO is the same chain fed by the E
transform. Per tensor ``w`` with gradient ``g`` at step ``t``::

    g = -g                                        # maximize=True
    g = E(g)                                      # ALTO only (transforms.e_gradient_)
    m, v = Adam moments of g                      # transforms.adam_moments_
    r = m_hat / (sqrt(v_hat) + eps) + wd * w      # transforms.adam_direction
    w = w - lr * ratio(||w||, ||r||) * r          # ratio 1 without trust ratio

:func:`layerwise_adam` groups the tensors by device and dtype and runs each group on
one path: a single-tensor loop (the reference), ``torch._foreach_*`` ops, or compiled
per-tensor steps (:mod:`largebatch.optim._compiled`). A fused-kernel path is one more
function with the same signature in :data:`_PATHS`.

``p.grad`` keeps the caller's gradient unless ``overwrite_grad=True``, which lets every
path use the gradient's memory for ``r`` (after the step it holds ``r``, as in NVIDIA
apex's fused LAMB): no temporary per tensor on the multi-tensor path, and on the
compiled path no second evaluation of ``r``. Without it, the compiled path advances the
moments and measures ``||w||`` and ``||r||`` in one fused pass, then evaluates ``r``
again from the new moments in the pass that moves the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from largebatch.optim import _base
from largebatch.optim._compiled import CompiledStep, scalar_dtype
from largebatch.optim.transforms import (
    adam_direction,
    adam_direction_scalars,
    adam_directions,
    adam_moments_,
    adam_moments_multi_,
    e_gradient_,
    e_gradients_,
)
from largebatch.optim.trust_ratio import norms, scale_by_ratio_

TrustRatio = Callable[[Tensor, Tensor], Tensor]
"""``(parameter norms, update norms) -> ratios``, element-wise (see :mod:`~largebatch.optim.trust_ratio`)."""


def layerwise_adam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    grad_emas: Sequence[Tensor] | None = None,
    alpha: float = 0.0,
    e_beta1: float = 0.0,
    trust_ratio: TrustRatio | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    maximize: bool,
    overwrite_grad: bool,
    foreach: bool | None,
    compiled: bool,
) -> None:
    """One step of the trust-ratio Adam family on lists of tensors (updated in place).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: parallel lists; the moments are advanced.
        state_steps: per-tensor step counts (0-dim tensors), incremented here.
        grad_emas: E's gradient EMA per tensor (ALTO), or ``None`` for no E transform.
        alpha, e_beta1: E's strength and EMA factor (with ``grad_emas``).
        trust_ratio: ratio of the norms, or ``None`` for plain Adam steps ``lr * r``.
        overwrite_grad: leave ``r`` in ``grads`` instead of the gradient.
        foreach, compiled: the execution path (:func:`~largebatch.optim._base.path_of`).
    """
    run = _PATHS[_base.path_of(foreach, compiled)]
    settings = dict(
        alpha=alpha,
        e_beta1=e_beta1,
        trust_ratio=trust_ratio,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=maximize,
        overwrite_grad=overwrite_grad,
    )
    with_emas = grad_emas is not None
    lists = [params, grads, *([grad_emas] if with_emas else []), exp_avgs, exp_avg_sqs]
    for *group, steps in _base.device_dtype_groups([*lists, state_steps]):
        torch._foreach_add_(steps, 1.0)
        scales, eps_hats = adam_direction_scalars(
            steps,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            bias_correction=bias_correction,
            dtype=group[0][0].dtype,
        )
        if not with_emas:
            group.insert(2, None)
        run(*group, scales, eps_hats, **settings)


def _single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    grad_emas: list[Tensor] | None,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scales: Sequence[Tensor],
    eps_hats: Sequence[Tensor],
    *,
    alpha: float,
    e_beta1: float,
    trust_ratio: TrustRatio | None,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    overwrite_grad: bool,
) -> None:
    """The reference loop: one tensor at a time, in the order of the equations."""
    for i, param in enumerate(params):
        fed = -grads[i] if maximize else grads[i]
        if grad_emas is not None:
            fed = e_gradient_(fed, grad_emas[i], alpha, e_beta1)
        adam_moments_(fed, exp_avgs[i], exp_avg_sqs[i], beta1, beta2)
        update = adam_direction(
            param, exp_avgs[i], exp_avg_sqs[i], scales[i], eps_hats[i], weight_decay
        )
        if overwrite_grad:
            update = grads[i].copy_(update)
        if trust_ratio is not None:
            ratio = trust_ratio(torch.linalg.vector_norm(param), torch.linalg.vector_norm(update))
            update = ratio * update
        param.add_(update, alpha=-lr)


def _multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    grad_emas: list[Tensor] | None,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scales: Sequence[Tensor],
    eps_hats: Sequence[Tensor],
    *,
    alpha: float,
    e_beta1: float,
    trust_ratio: TrustRatio | None,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    overwrite_grad: bool,
) -> None:
    """``torch._foreach_*`` ops over the group: one memory pass per op."""
    fed: Sequence[Tensor] = torch._foreach_neg(grads) if maximize else grads
    if grad_emas is not None:
        fed = e_gradients_(fed, grad_emas, alpha, e_beta1)
    adam_moments_multi_(fed, exp_avgs, exp_avg_sqs, beta1, beta2)
    del fed
    updates = adam_directions(
        params,
        exp_avgs,
        exp_avg_sqs,
        scales,
        eps_hats,
        weight_decay,
        out=grads if overwrite_grad else None,
    )
    if trust_ratio is not None:
        ratios = trust_ratio(norms(params), norms(updates))
        if overwrite_grad:  # r stays in the gradients; the ratio goes into the step
            torch._foreach_addcmul_(params, updates, list((-lr * ratios).unbind()))
            return
        scale_by_ratio_(updates, ratios)
    torch._foreach_add_(params, updates, alpha=-lr)


# --- the compiled path ---------------------------------------------------------------------


def _moments_and_norms_(
    param: Tensor,
    grad: Tensor,
    fed: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor,
    eps_hat: Tensor,
    *,
    beta1: Tensor,
    beta2: Tensor,
    weight_decay: Tensor,
    overwrite_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Advance the moments by ``fed``; return ``||w||`` and ``||r||`` (``r`` into ``grad`` if asked)."""
    adam_moments_(fed, exp_avg, exp_avg_sq, beta1, beta2)
    update = adam_direction(param, exp_avg, exp_avg_sq, scale, eps_hat, weight_decay)
    if overwrite_grad:
        update = grad.copy_(update)
    return torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)


def adam_norms_tensor_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor,
    eps_hat: Tensor,
    *,
    beta1: Tensor,
    beta2: Tensor,
    weight_decay: Tensor,
    maximize: bool,
    overwrite_grad: bool,
) -> tuple[Tensor, Tensor]:
    """First compiled pass of LAMB on one tensor: moments, then ``||w||`` and ``||r||``."""
    fed = -grad if maximize else grad
    return _moments_and_norms_(
        param,
        grad,
        fed,
        exp_avg,
        exp_avg_sq,
        scale,
        eps_hat,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        overwrite_grad=overwrite_grad,
    )


def e_adam_norms_tensor_step_(
    param: Tensor,
    grad: Tensor,
    grad_ema: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor,
    eps_hat: Tensor,
    *,
    alpha: Tensor,
    e_beta1: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    weight_decay: Tensor,
    maximize: bool,
    overwrite_grad: bool,
) -> tuple[Tensor, Tensor]:
    """First compiled pass of ALTO on one tensor: E, moments, then ``||w||`` and ``||r||``."""
    fed = e_gradient_(-grad if maximize else grad, grad_ema, alpha, e_beta1)
    return _moments_and_norms_(
        param,
        grad,
        fed,
        exp_avg,
        exp_avg_sq,
        scale,
        eps_hat,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        overwrite_grad=overwrite_grad,
    )


def apply_adam_direction_tensor_step_(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scale: Tensor,
    eps_hat: Tensor,
    coefficient: Tensor,
    *,
    weight_decay: Tensor,
) -> None:
    """Second compiled pass: ``w += coefficient * r``, ``r`` evaluated from the new moments."""
    param.add_(
        coefficient * adam_direction(param, exp_avg, exp_avg_sq, scale, eps_hat, weight_decay)
    )


# Realising the new moments (``realize_reads_threshold=1``) lets inductor store them and
# reduce ``||r||`` in one loop; by default it recomputes them in a second loop.
_SINGLE_PASS_MOMENTS = {"realize_reads_threshold": 1}
_COMPILED_NORMS = {
    False: CompiledStep(adam_norms_tensor_step_, inductor_options=_SINGLE_PASS_MOMENTS),
    True: CompiledStep(e_adam_norms_tensor_step_, inductor_options=_SINGLE_PASS_MOMENTS),
}
_COMPILED_APPLY = CompiledStep(apply_adam_direction_tensor_step_)


def _compiled(
    params: list[Tensor],
    grads: list[Tensor],
    grad_emas: list[Tensor] | None,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    scales: Sequence[Tensor],
    eps_hats: Sequence[Tensor],
    **settings: Any,
) -> None:
    """Two fused passes per tensor (small tensors: the multi-tensor step).

    The first advances E and the moments and returns both norms; the group's trust
    ratios follow from the stacked norms; the second moves the parameters.
    """
    emas = [] if grad_emas is None else [grad_emas]
    small, large = _base.split_by_numel(
        [params, grads, *emas, exp_avgs, exp_avg_sqs, list(scales), list(eps_hats)]
    )
    for lists in (small, large):
        if grad_emas is None:
            lists.insert(2, None)
    if small[0]:
        _multi_tensor(*small, **settings)
    if not large[0]:
        return
    params, grads, grad_emas, exp_avgs, exp_avg_sqs, scales, eps_hats = large
    hyperparameters = {
        "beta1": settings["beta1"],
        "beta2": settings["beta2"],
        "weight_decay": settings["weight_decay"],
    }
    if grad_emas is not None:
        hyperparameters.update(alpha=settings["alpha"], e_beta1=settings["e_beta1"])
    overwrite_grad = settings["overwrite_grad"]
    measured = _COMPILED_NORMS[grad_emas is not None](
        [params, grads, *([] if grad_emas is None else [grad_emas]), exp_avgs, exp_avg_sqs],
        scalar_lists=[scales, eps_hats],
        hyperparameters=hyperparameters,
        options={"maximize": settings["maximize"], "overwrite_grad": overwrite_grad},
    )
    lr, trust_ratio = settings["lr"], settings["trust_ratio"]
    dtype = scalar_dtype(params[0].dtype)
    if trust_ratio is None:
        coefficients = torch.full((len(params),), -lr, dtype=dtype, device=params[0].device)
    else:
        param_norms, update_norms = (torch.stack(values).to(dtype) for values in zip(*measured))
        coefficients = -lr * trust_ratio(param_norms, update_norms)
    coefficients = list(coefficients.unbind())
    if overwrite_grad:
        torch._foreach_addcmul_(params, grads, coefficients)
    else:
        _COMPILED_APPLY(
            [params, exp_avgs, exp_avg_sqs],
            scalar_lists=[scales, eps_hats, coefficients],
            hyperparameters={"weight_decay": settings["weight_decay"]},
        )


_PATHS = {
    _base.Path.SINGLE_TENSOR: _single_tensor,
    _base.Path.MULTI_TENSOR: _multi_tensor,
    _base.Path.COMPILED: _compiled,
}
"""The implementation of each execution path."""
