"""LAMB: Adam moments with a layer-wise trust ratio (You et al. 2019, ICLR 2020, Alg. 2).

Per parameter tensor ``w`` (a "layer") with gradient ``g`` at step ``t``::

    m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t)              v_hat = v / (1 - beta2^t)      # bias_correction
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
    w = w - lr * phi(||w||) / ||r|| * r    # ratio 1 where ||w|| or ||r|| is 0

``phi`` clamps ``||w||`` to ``weight_norm_clamp = (low, high)`` (identity when
``None``); ``trust_ratio_clamp = (low, high)`` then clamps the ratio itself. A group with ``trust_ratio=False`` (biases, norm weights) takes the
plain step ``lr * r``. ``maximize=True`` uses ``-g``.

The arithmetic is shared with ALTO (:mod:`largebatch.optim._layerwise_adam`, on the
transforms of :mod:`largebatch.optim.transforms`): :func:`lamb` is the functional form
over lists of tensors, and :class:`LAMB` calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from torch import Tensor

from largebatch.optim._base import LayerwiseOptimizer, check_betas, check_flag, check_non_negative
from largebatch.optim._layerwise_adam import layerwise_adam
from largebatch.optim.trust_ratio import lamb_trust_ratio


def lamb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    weight_norm_clamp: tuple[float, float] | None = None,
    trust_ratio_clamp: tuple[float, float] | None = None,
    trust_ratio: bool = True,
    maximize: bool = False,
    overwrite_grad: bool = False,
    foreach: bool | None = None,
    compiled: bool = False,
    fused: bool | None = None,
) -> None:
    """One LAMB step on lists of tensors, in place (the functional form of :class:`LAMB`).

    ``exp_avgs``/``exp_avg_sqs`` start as zeros and ``state_steps`` as 0-dim zeros
    (incremented here); the other arguments are those of :class:`LAMB`.
    """
    norm_min, norm_max = weight_norm_clamp if weight_norm_clamp is not None else (None, None)
    ratio_min, ratio_max = trust_ratio_clamp if trust_ratio_clamp is not None else (None, None)
    ratio = partial(
        lamb_trust_ratio,
        norm_min=norm_min,
        norm_max=norm_max,
        ratio_min=ratio_min,
        ratio_max=ratio_max,
    )
    layerwise_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        trust_ratio=ratio if trust_ratio else None,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
        maximize=maximize,
        overwrite_grad=overwrite_grad,
        foreach=foreach,
        compiled=compiled,
        fused=fused,
    )


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
        trust_ratio_clamp: ``(low, high)`` bounds of the ratio ``phi(||w||) / ||r||``
            (e.g. ``(0.01, 100)`` in Shacklett et al.'s large-batch PPO); ``None`` for none.
        trust_ratio: default of the per-group switch.
        maximize: maximize the objective (step along ``+g``), as in ``torch.optim``.
        overwrite_grad: use ``p.grad`` as scratch for the update direction ``r``
            (after ``step()`` it holds ``r``, as in NVIDIA apex's fused LAMB): saves a
            temporary per tensor (multi-tensor path) or a second evaluation of ``r``
            (compiled path). Off: ``p.grad`` keeps the gradient, on every path.
        foreach: ``False`` runs the single-tensor loop, ``True`` the multi-tensor path.
        compiled: run ``torch.compile``'d steps (per tensor, one fused memory pass for
            the moments and the norms, then one for the parameters; fastest on CPU).
            The first step compiles; inductor's on-disk cache keeps the
            shape-generic graphs for later runs (times in ``docs/optimizers.md``).
        fused: ``True`` runs multi-tensor Triton kernels (as apex's ``FusedLAMB``: one
            launch for every tensor's moments, ``r`` and norms, one for the updates);
            ``False`` never does. With ``foreach`` and ``fused`` unset and
            ``compiled=False``, CUDA tensors the kernels support
            (float32/float16/bfloat16) take the fused path, all others the
            multi-tensor path (``docs/optimizers.md``, "Execution paths").
    """

    state_buffers = ("exp_avg", "exp_avg_sq")
    counts_steps = True
    functional = staticmethod(lamb)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        weight_norm_clamp: tuple[float, float] | None = None,
        trust_ratio_clamp: tuple[float, float] | None = None,
        *,
        trust_ratio: bool = True,
        maximize: bool = False,
        overwrite_grad: bool = False,
        foreach: bool | None = None,
        compiled: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                bias_correction=bias_correction,
                weight_norm_clamp=None if weight_norm_clamp is None else tuple(weight_norm_clamp),
                trust_ratio_clamp=None if trust_ratio_clamp is None else tuple(trust_ratio_clamp),
                overwrite_grad=overwrite_grad,
            ),
            trust_ratio=trust_ratio,
            maximize=maximize,
            foreach=foreach,
            compiled=compiled,
            fused=fused,
        )

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        check_betas(group["betas"], 2)
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        check_flag("bias_correction", group["bias_correction"])
        check_flag("overwrite_grad", group["overwrite_grad"])
        for name in ("weight_norm_clamp", "trust_ratio_clamp"):
            clamp = group[name]
            if clamp is not None and not (len(clamp) == 2 and 0.0 <= clamp[0] <= clamp[1]):
                raise ValueError(f"Invalid {name} value: {clamp}; expected 0 <= low <= high")

    def _hyperparameters(self, group: Mapping[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"],
            weight_norm_clamp=group["weight_norm_clamp"],
            trust_ratio_clamp=group.get("trust_ratio_clamp"),
            overwrite_grad=group["overwrite_grad"],
        )
