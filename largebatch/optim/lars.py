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
SGD steps. ``maximize=True`` uses ``-g``.

:func:`lars` is the functional form over lists of tensors; :class:`LARS` calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from largebatch.optim import _base, _fused
from largebatch.optim._base import LayerwiseOptimizer, check_flag, check_non_negative
from largebatch.optim._compiled import CompiledStep, select_entries
from largebatch.optim.trust_ratio import lars_trust_ratio, norms


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
    maximize: bool,
) -> None:
    """LARS update of one parameter tensor in place, given its trust ratio (single-tensor and compiled paths).

    ``ratio`` is ``None`` for a group without trust ratio (plain momentum SGD).
    """
    update = (-grad if maximize else grad) + weight_decay * param
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
    maximize: bool,
) -> None:
    """LARS update of many tensors (one device and dtype) with ``torch._foreach_*`` ops.

    ``ratios``: one per tensor (0-dim tensors, or the entries of a vector).
    """
    if maximize:
        updates = torch._foreach_neg(grads)
        torch._foreach_add_(updates, params, alpha=weight_decay)
    else:
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


def _single_tensor_lars(*tensor_lists: Sequence[Tensor], **settings: Any) -> None:
    for tensors in zip(*tensor_lists):
        lars_tensor_step_(*tensors, **settings)


def _compiled_lars(*tensor_lists: list[Tensor], nesterov: bool, maximize: bool, **floats) -> None:
    """Tensors below ``COMPILE_MIN_NUMEL`` take the multi-tensor step, the others one fused pass."""
    small, large = (select_entries(tensor_lists, i) for i in _base.small_and_large(tensor_lists[0]))
    options = {"nesterov": nesterov, "maximize": maximize}
    if small[0]:
        _multi_tensor_lars(*small, **floats, **options)
    if large[0]:
        _COMPILED_LARS(large[:3], scalar_lists=large[3:], hyperparameters=floats, options=options)


def _fused_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    ratios: Tensor | None = None,
    *,
    table: _fused.TensorTable,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """LARS update of a whole group in one multi-tensor Triton launch (:mod:`._fused`)."""
    if table.chunks == 0:  # every tensor is empty
        return
    with _fused.device_context(params[0].device):
        _fused.kernels().lars_kernel[(table.chunks,)](
            *table.addresses, table.numels, table.chunk_tensors, table.chunk_starts,
            table.numels if ratios is None else ratios.float(),  # unread without a ratio
            -float(lr), float(momentum), float(weight_decay),
            HAS_RATIO=ratios is not None, NESTEROV=nesterov, MAXIMIZE=maximize,
            **_fused.launch_constants(table, params[0].dtype),
        )  # fmt: skip
    _fused.mark_modified(params)


_PATHS = {
    _base.Path.SINGLE_TENSOR: _single_tensor_lars,
    _base.Path.MULTI_TENSOR: _multi_tensor_lars,
    _base.Path.COMPILED: _compiled_lars,
    _base.Path.FUSED: _fused_lars,
}


def lars(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coef: float,
    eps: float = 0.0,
    nesterov: bool = False,
    clip: bool = False,
    trust_ratio: bool = True,
    maximize: bool = False,
    foreach: bool | None = None,
    compiled: bool = False,
    fused: bool | None = None,
) -> None:
    """One LARS step on lists of tensors, in place (the functional form of :class:`LARS`).

    ``momentum_buffers`` start as zeros. The trust ratios come from the norms of each
    device/dtype group (``trust_ratio=False``: plain momentum SGD); ``foreach``,
    ``compiled`` and ``fused`` pick the execution path as in :class:`LARS`.
    """
    requested = _base.path_of(foreach, compiled, fused)
    groups = _base.device_dtype_groups([params, grads, momentum_buffers])
    for (device_params, device_grads, device_buffers), (path, table) in zip(
        groups, _base.group_paths(requested, groups)
    ):
        ratios = None
        if trust_ratio:
            ratios = lars_trust_ratio(
                norms(device_params),
                norms(device_grads),
                trust_coef=trust_coef,
                weight_decay=weight_decay,
                eps=eps,
                clip_lr=lr if clip else None,
            )
        _PATHS[path](
            device_params,
            device_grads,
            device_buffers,
            *([] if ratios is None else [ratios]),
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            **({} if table is None else {"table": table}),
        )


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
        maximize: maximize the objective (step along ``+g``), as in ``torch.optim``.
        foreach: ``False`` runs the single-tensor loop, ``True`` the multi-tensor path.
        compiled: run a ``torch.compile``'d step (the group's norms and trust ratios,
            then one fused memory pass per tensor; fastest on CPU). The first step
            compiles; inductor's on-disk cache keeps the shape-generic graphs for
            later runs (times in ``docs/optimizers.md``).
        fused: ``True`` runs multi-tensor Triton kernels (the group's norms, then one
            launch for every tensor's update); ``False`` never does. With ``foreach``
            and ``fused`` unset and ``compiled=False``, CUDA tensors the kernels
            support (float32/float16/bfloat16) take the fused path, all others the
            multi-tensor path (``docs/optimizers.md``, "Execution paths").
    """

    state_buffers = ("momentum_buffer",)
    counts_steps = False
    functional = staticmethod(lars)

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
        maximize: bool = False,
        foreach: bool | None = None,
        compiled: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coef=trust_coef,
                eps=eps,
                nesterov=nesterov,
                clip=clip,
            ),
            trust_ratio=trust_ratio,
            maximize=maximize,
            foreach=foreach,
            compiled=compiled,
            fused=fused,
        )

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        if not (isinstance(group["momentum"], int | float) and 0.0 <= group["momentum"] < 1.0):
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        for name in ("weight_decay", "trust_coef", "eps"):
            check_non_negative(name, group[name])
        check_flag("nesterov", group["nesterov"])
        check_flag("clip", group["clip"])
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("Nesterov momentum requires a momentum > 0")

    def _hyperparameters(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {
            name: group[name]
            for name in ("momentum", "weight_decay", "trust_coef", "eps", "nesterov", "clip")
        }
