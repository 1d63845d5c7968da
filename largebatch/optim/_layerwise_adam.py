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
one path (:data:`_PATHS`): a single-tensor loop (the reference), ``torch._foreach_*``
ops, compiled per-tensor steps (:mod:`largebatch.optim._compiled`), or multi-tensor
Triton kernels (:mod:`largebatch.optim._fused`, the default for CUDA tensors).

``p.grad`` keeps the caller's gradient unless ``overwrite_grad=True``, which lets every
path use the gradient's memory for ``r`` (after the step it holds ``r``, as in NVIDIA
apex's fused LAMB): no temporary per tensor on the multi-tensor path, and on the
compiled path no second evaluation of ``r``. Without it, the compiled path advances the
moments and measures ``||w||`` and ``||r||`` in one fused pass, then evaluates ``r``
again from the new moments in the pass that moves the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from largebatch.optim import _base, _fused
from largebatch.optim._compiled import CompiledStep, scalar_dtype
from largebatch.optim.transforms import (
    adam_direction,
    adam_direction_scalars,
    adam_directions,
    adam_moments_,
    adam_moments_multi_,
    e_gradient_,
    e_gradients_,
    extrapolation_coefficient,
)
from largebatch.optim.trust_ratio import norms, scale_by_ratio_

TrustRatio = Callable[[Tensor, Tensor], Tensor]
"""``(parameter norms, update norms) -> ratios``, element-wise (see :mod:`~largebatch.optim.trust_ratio`)."""


@dataclass(frozen=True)
class _Settings:
    """What one step applies to every device/dtype group."""

    trust_ratio: TrustRatio | None
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    alpha: float
    e_beta1: float
    maximize: bool
    overwrite_grad: bool


@dataclass(frozen=True)
class _Group:
    """One device/dtype group's parallel lists (``grad_emas`` is ``None`` without E).

    ``scales`` and ``eps_hats`` are vectors with one entry per tensor
    (:func:`~largebatch.optim.transforms.adam_direction_scalars`); ``table`` is the
    fused path's :class:`~largebatch.optim._fused.TensorTable` (``None`` on other paths).
    """

    params: list[Tensor]
    grads: list[Tensor]
    grad_emas: list[Tensor] | None
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    scales: Tensor
    eps_hats: Tensor
    table: _fused.TensorTable | None = None

    def select(self, indices: Sequence[int]) -> _Group:
        """The group restricted to the tensors at ``indices`` (lists and vectors; no table)."""
        lists = [
            None if tensors is None else [tensors[i] for i in indices]
            for tensors in (
                self.params,
                self.grads,
                self.grad_emas,
                self.exp_avgs,
                self.exp_avg_sqs,
            )
        ]
        return _Group(*lists, self.scales[list(indices)], self.eps_hats[list(indices)])


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
    fused: bool | None,
) -> None:
    """One step of the trust-ratio Adam family on lists of tensors (updated in place).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: parallel lists; the moments are advanced.
        state_steps: per-tensor step counts (0-dim tensors), incremented here.
        grad_emas: E's gradient EMA per tensor (ALTO), or ``None`` for no E transform.
        alpha, e_beta1: E's strength and EMA factor (with ``grad_emas``).
        trust_ratio: ratio of the norms, or ``None`` for plain Adam steps ``lr * r``.
        overwrite_grad: leave ``r`` in ``grads`` instead of the gradient.
        foreach, compiled, fused: the execution path (:func:`~largebatch.optim._base.path_of`;
            all unset: chosen per device/dtype group by :func:`~largebatch.optim._base.group_paths`).
    """
    requested = _base.path_of(foreach, compiled, fused)
    settings = _Settings(
        trust_ratio, lr, beta1, beta2, weight_decay, alpha, e_beta1, maximize, overwrite_grad
    )
    emas = [] if grad_emas is None else [grad_emas]
    groups = _base.device_dtype_groups([params, grads, *emas, exp_avgs, exp_avg_sqs, state_steps])
    paths = _base.group_paths(requested, [lists[:-1] for lists in groups])
    for (device_params, device_grads, *rest, steps), (path, table) in zip(groups, paths):
        torch._foreach_add_(steps, 1.0)
        scales, eps_hats = adam_direction_scalars(
            steps,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            bias_correction=bias_correction,
            dtype=device_params[0].dtype,
        )
        *device_emas, device_avgs, device_sqs = rest
        group = _Group(
            device_params,
            device_grads,
            device_emas[0] if device_emas else None,
            device_avgs,
            device_sqs,
            scales,
            eps_hats,
            table,
        )
        _PATHS[path](group, settings)


def _single_tensor(group: _Group, settings: _Settings) -> None:
    """The reference loop: one tensor at a time, in the order of the equations."""
    for i, param in enumerate(group.params):
        grad = group.grads[i]
        fed = -grad if settings.maximize else grad
        if group.grad_emas is not None:
            fed = e_gradient_(fed, group.grad_emas[i], settings.alpha, settings.e_beta1)
        exp_avg, exp_avg_sq = group.exp_avgs[i], group.exp_avg_sqs[i]
        adam_moments_(fed, exp_avg, exp_avg_sq, settings.beta1, settings.beta2)
        update = adam_direction(
            param, exp_avg, exp_avg_sq, group.scales[i], group.eps_hats[i], settings.weight_decay
        )
        if settings.overwrite_grad:
            update = grad.copy_(update)
        if settings.trust_ratio is not None:
            norms_ = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
            update = settings.trust_ratio(*norms_) * update
        param.add_(update, alpha=-settings.lr)


def _multi_tensor(group: _Group, settings: _Settings) -> None:
    """``torch._foreach_*`` ops over the group: one memory pass per op."""
    fed: Sequence[Tensor] = torch._foreach_neg(group.grads) if settings.maximize else group.grads
    if group.grad_emas is not None:
        fed = e_gradients_(fed, group.grad_emas, settings.alpha, settings.e_beta1)
    adam_moments_multi_(fed, group.exp_avgs, group.exp_avg_sqs, settings.beta1, settings.beta2)
    del fed
    updates = adam_directions(
        group.params,
        group.exp_avgs,
        group.exp_avg_sqs,
        group.scales.unbind(),
        group.eps_hats.unbind(),
        settings.weight_decay,
        out=group.grads if settings.overwrite_grad else None,
    )
    if settings.trust_ratio is None:
        torch._foreach_add_(group.params, updates, alpha=-settings.lr)
        return
    ratios = settings.trust_ratio(norms(group.params), norms(updates))
    if settings.overwrite_grad:  # r stays in the gradients; the ratio goes into the step
        torch._foreach_addcmul_(group.params, updates, list((-settings.lr * ratios).unbind()))
    else:
        scale_by_ratio_(updates, ratios)
        torch._foreach_add_(group.params, updates, alpha=-settings.lr)


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
    maximize: bool,
    **hyperparameters: Tensor | bool,
) -> tuple[Tensor, Tensor]:
    """First compiled pass of LAMB on one tensor: moments, then ``||w||`` and ``||r||``."""
    fed = -grad if maximize else grad
    return _moments_and_norms_(
        param, grad, fed, exp_avg, exp_avg_sq, scale, eps_hat, **hyperparameters
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
    maximize: bool,
    **hyperparameters: Tensor | bool,
) -> tuple[Tensor, Tensor]:
    """First compiled pass of ALTO on one tensor: E, moments, then ``||w||`` and ``||r||``."""
    fed = e_gradient_(-grad if maximize else grad, grad_ema, alpha, e_beta1)
    return _moments_and_norms_(
        param, grad, fed, exp_avg, exp_avg_sq, scale, eps_hat, **hyperparameters
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
    r = adam_direction(param, exp_avg, exp_avg_sq, scale, eps_hat, weight_decay)
    param.add_(coefficient * r)


# Realising the new moments (``realize_reads_threshold=1``) lets inductor store them and
# reduce ``||r||`` in the same loop; by default it recomputes them in a second loop.
_SINGLE_PASS_MOMENTS = {"realize_reads_threshold": 1}
_COMPILED_NORMS = {
    False: CompiledStep(adam_norms_tensor_step_, inductor_options=_SINGLE_PASS_MOMENTS),
    True: CompiledStep(e_adam_norms_tensor_step_, inductor_options=_SINGLE_PASS_MOMENTS),
}
_COMPILED_APPLY = CompiledStep(apply_adam_direction_tensor_step_)


def _compiled(group: _Group, settings: _Settings) -> None:
    """Two fused passes per tensor (tensors below ``COMPILE_MIN_NUMEL``: the multi-tensor step).

    The first advances E and the moments and returns both norms; the group's trust
    ratios follow from the stacked norms; the second moves the parameters.
    """
    small, large = (group.select(indices) for indices in _base.small_and_large(group.params))
    if small.params:
        _multi_tensor(small, settings)
    if not large.params:
        return
    with_e = large.grad_emas is not None
    hyperparameters = {
        "beta1": settings.beta1,
        "beta2": settings.beta2,
        "weight_decay": settings.weight_decay,
    }
    if with_e:
        hyperparameters.update(alpha=settings.alpha, e_beta1=settings.e_beta1)
    scalar_lists = [large.scales.unbind(), large.eps_hats.unbind()]
    measured = _COMPILED_NORMS[with_e](
        [large.params, large.grads, *([large.grad_emas] if with_e else [])]
        + [large.exp_avgs, large.exp_avg_sqs],
        scalar_lists=scalar_lists,
        hyperparameters=hyperparameters,
        options={"maximize": settings.maximize, "overwrite_grad": settings.overwrite_grad},
    )
    dtype = scalar_dtype(large.params[0].dtype)
    if settings.trust_ratio is None:
        ratios = torch.ones(len(large.params), dtype=dtype, device=large.params[0].device)
    else:
        param_norms, update_norms = (torch.stack(values).to(dtype) for values in zip(*measured))
        ratios = settings.trust_ratio(param_norms, update_norms)
    coefficients = list((-settings.lr * ratios).unbind())
    if settings.overwrite_grad:
        torch._foreach_addcmul_(large.params, large.grads, coefficients)
    else:
        _COMPILED_APPLY(
            [large.params, large.exp_avgs, large.exp_avg_sqs],
            scalar_lists=[*scalar_lists, coefficients],
            hyperparameters={"weight_decay": settings.weight_decay},
        )


# --- the fused path --------------------------------------------------------------------------


def _fused_kernels(group: _Group, settings: _Settings) -> None:
    """Multi-tensor Triton kernels: one launch per pass over the whole group.

    With a trust ratio: one pass for E, the moments, ``r`` and the chunks' sums of
    ``w^2`` and ``r^2``; a small launch for the per-tensor norms; the ratios from the
    shared trust-ratio function; one pass for ``w += -lr * ratio * r`` (``r`` read from
    the gradient with ``overwrite_grad``, otherwise evaluated again from the new
    moments). Without: one pass that also moves the parameters.
    """
    table = group.table
    if table.chunks == 0:  # every tensor is empty
        return
    kernels = _fused.kernels()
    with_e = group.grad_emas is not None
    w, g, *e, m, v = table.addresses
    apply_now = settings.trust_ratio is None
    device = group.scales.device
    partial_sums = torch.empty(2 * table.chunks, dtype=torch.float32, device=device)
    constants = _fused.launch_constants(table, group.params[0].dtype)
    with _fused.device_context(device):
        kernels.adam_direction_kernel[(table.chunks,)](
            w, g, e[0] if with_e else w, m, v,
            table.numels, table.chunk_tensors, table.chunk_starts,
            group.scales, group.eps_hats, partial_sums,
            -float(settings.lr),
            1.0 - float(settings.beta1), float(settings.beta2), 1.0 - float(settings.beta2),
            float(settings.weight_decay),
            float(extrapolation_coefficient(settings.alpha, settings.e_beta1)),
            1.0 - float(settings.e_beta1),
            HAS_E=with_e, MAXIMIZE=settings.maximize,
            OVERWRITE_GRAD=settings.overwrite_grad, APPLY=apply_now, **constants,
        )  # fmt: skip
        if not apply_now:
            ratios = settings.trust_ratio(*_fused.segment_norms(table, partial_sums))
            kernels.apply_direction_kernel[(table.chunks,)](
                w, g, m, v, table.numels, table.chunk_tensors, table.chunk_starts,
                group.scales, group.eps_hats, -float(settings.lr) * ratios,
                float(settings.weight_decay),
                R_IN_GRAD=settings.overwrite_grad, **constants,
            )  # fmt: skip
    _fused.mark_modified(group.params, group.grads if settings.overwrite_grad else [])


_PATHS: dict[_base.Path, Callable[[_Group, _Settings], None]] = {
    _base.Path.SINGLE_TENSOR: _single_tensor,
    _base.Path.MULTI_TENSOR: _multi_tensor,
    _base.Path.COMPILED: _compiled,
    _base.Path.FUSED: _fused_kernels,
}
"""The implementation of each execution path."""
