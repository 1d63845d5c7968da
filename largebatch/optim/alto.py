"""ALTO (Zhao et al., NeurIPS 2025, Alg. 2): LAMB fed the E-transformed gradient.

Per parameter tensor ``w`` (a "layer") with gradient ``g`` at step ``t``; ``ghat`` is
the E-transformed gradient of :mod:`largebatch.optim.transforms`. In the paper's
names (its ``beta1`` is E's, its ``beta2, beta3`` are Adam's)::

    ghat = lerp(mu, g, 1 + alpha (1 - beta1));   mu = lerp(mu, g, 1 - beta1)
    m = beta2 m + (1 - beta2) ghat;              v = beta3 v + (1 - beta3) ghat^2
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w       # m_hat, v_hat bias-corrected
    w = w - lr * phi(||w||) / (||r|| + eps2 phi(||w||)) * r,  phi(x) = x + eps3

The arguments follow torch's convention instead: ``betas = (beta1, beta2)`` are
the decays of Adam's first and second moments (the paper's ``beta2, beta3``), the
values LR schedulers with ``cycle_momentum`` cycle, and E's factor (the paper's
``beta1``) is ``e_beta1``. The trust ratio is 1 where ``||w||`` or ``||r||`` is 0 (as
LAMB's and the reference code's), so a zero-initialised tensor moves. A group with
``trust_ratio=False`` (biases, norm weights) takes the plain step ``lr * r``.
``maximize=True`` feeds E with ``-g``.

This follows the paper, not the reference code (``e-optimizer-adaptor`` 0.1.0), which
also clips the global gradient norm to 1 inside ``step``, uses ``||w|| / ||r||`` and
skips the ratio wherever weight decay is 0; clipping in the training loop,
``eps2 = eps3 = 0`` and ``trust_ratio=False`` on the zero-decay group reproduce it (see
``tests/optim/test_alto.py``).

:func:`alto` is the functional form over lists of tensors; :class:`ALTO` calls it. Both
run LAMB's arithmetic (:mod:`largebatch.optim._layerwise_adam`) with E in front.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any

from torch import Tensor

from largebatch.optim._base import LayerwiseOptimizer, check_betas, check_flag, check_non_negative
from largebatch.optim._layerwise_adam import layerwise_adam
from largebatch.optim.transforms import check_e_hyperparameters
from largebatch.optim.trust_ratio import alto_trust_ratio


def alto(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    grad_emas: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    alpha: float,
    e_beta1: float,
    weight_decay: float,
    eps: float,
    eps2: float,
    eps3: float,
    trust_ratio: bool = True,
    maximize: bool = False,
    overwrite_grad: bool = False,
    foreach: bool | None = None,
    compiled: bool = False,
    fused: bool | None = None,
) -> None:
    """One ALTO step on lists of tensors, in place (the functional form of :class:`ALTO`).

    ``grad_emas`` (E's buffer), ``exp_avgs`` and ``exp_avg_sqs`` start as zeros and
    ``state_steps`` as 0-dim zeros (incremented here); ``beta1, beta2`` are Adam's
    moment decays and ``e_beta1`` E's factor; the rest are :class:`ALTO`'s arguments.
    """
    layerwise_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        grad_emas=grad_emas,
        alpha=alpha,
        e_beta1=e_beta1,
        trust_ratio=partial(alto_trust_ratio, eps2=eps2, eps3=eps3) if trust_ratio else None,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction=True,
        maximize=maximize,
        overwrite_grad=overwrite_grad,
        foreach=foreach,
        compiled=compiled,
        fused=fused,
    )


class ALTO(LayerwiseOptimizer):
    """LAMB fed E-transformed gradients, with bias correction and the paper's trust ratio.

    Args:
        params: parameters or parameter groups. A group may set ``trust_ratio=False``
            (biases, norm weights) to take the plain Adam-style step ``lr * r``.
        lr: learning rate.
        betas: ``(beta1, beta2)``: decay of Adam's first and second moments, each in
            [0, 1) (the paper's ``beta2, beta3``; what ``OneCycleLR``/``CyclicLR`` cycle).
        alpha: E strength, ``|alpha| <= 1 / (1 - e_beta1)``: negative explores (large
            batches), positive exploits (small batches).
        weight_decay: ``lambda``, added to the update inside the trust ratio (LAMB style).
        eps: ``eps1``, added to ``sqrt(v_hat)``.
        eps2: trust-ratio denominator guard; caps the ratio near ``1 / eps2``.
        eps3: ``phi`` guard, ``phi(x) = x + eps3``.
        e_beta1: EMA factor of the gradient differences (E; the paper's ``beta1``).
        trust_ratio: default of the per-group layer-wise switch.
        maximize: maximize the objective (E is fed ``-g``), as in ``torch.optim``.
        overwrite_grad: use ``p.grad`` as scratch for ``r`` (after ``step()`` it holds
            ``r``); see :class:`~largebatch.optim.lamb.LAMB`.
        foreach: ``False`` runs the single-tensor loop, ``True`` the multi-tensor path.
        compiled: run ``torch.compile``'d steps (per tensor, one fused memory pass for
            E, the moments and the norms, then one for the parameters). The first step
            compiles, cached on disk for later runs.
        fused: ``True`` runs multi-tensor Triton kernels (one launch for every
            tensor's E, moments, ``r`` and norms, one for the updates); ``False``
            never does; unset, as :class:`~largebatch.optim.lamb.LAMB`'s (the default
            on CUDA).

    Defaults are the paper's large-batch (>= 1K) ones; ``ALTO(params, **ALTO.SMALL_BATCH)``
    gives its small-batch setting (``alpha=0.5, e_beta1=0.01``).
    """

    SMALL_BATCH = MappingProxyType({"alpha": 0.5, "e_beta1": 0.01})
    """The paper's setting for batches below 1K (Sec. 4): exploit with a short memory."""

    state_buffers = ("grad_ema", "exp_avg", "exp_avg_sq")
    counts_steps = True
    functional = staticmethod(alto)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        alpha: float = -5.0,
        weight_decay: float = 1e-4,
        eps: float = 1e-6,
        eps2: float = 1e-6,
        eps3: float = 1e-10,
        *,
        e_beta1: float = 0.99,
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
                alpha=alpha,
                e_beta1=e_beta1,
                weight_decay=weight_decay,
                eps=eps,
                eps2=eps2,
                eps3=eps3,
                overwrite_grad=overwrite_grad,
            ),
            trust_ratio=trust_ratio,
            maximize=maximize,
            foreach=foreach,
            compiled=compiled,
            fused=fused,
        )

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        if len(group["betas"]) == 3:
            raise ValueError(
                f"Invalid betas: {tuple(group['betas'])}; ALTO's betas are (beta1, beta2) of "
                "Adam's moments (the paper's beta2, beta3), and E's factor (the paper's beta1) "
                "is e_beta1: e.g. betas=(0.9, 0.99), e_beta1=0.99"
            )
        check_betas(group["betas"], 2)
        check_e_hyperparameters(group["alpha"], group["e_beta1"])
        for name in ("weight_decay", "eps", "eps2", "eps3"):
            check_non_negative(name, group[name])
        check_flag("overwrite_grad", group["overwrite_grad"])

    def _hyperparameters(self, group: Mapping[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            **{
                name: group[name]
                for name in (
                    "alpha",
                    "e_beta1",
                    "weight_decay",
                    "eps",
                    "eps2",
                    "eps3",
                    "overwrite_grad",
                )
            },
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Groups saved with the paper-order ``betas = (E's beta1, beta2, beta3)`` are converted."""
        for group in state.get("param_groups", ()):
            if len(group.get("betas", ())) == 3:
                e_beta1, *betas = group["betas"]
                group["betas"], group["e_beta1"] = tuple(betas), e_beta1
        super().__setstate__(state)
