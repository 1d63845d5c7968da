"""SAGA (Defazio, Bach & Lacoste-Julien 2014; the review's Algorithm 5.2), mini-batch form.

For a finite sum ``R_n(w) = (1/n) sum_i f_i(w)`` SAGA keeps a table ``y_i`` of
the last gradient seen for every example ``i`` and its mean ``ybar``. On a batch
``S`` with per-example gradients ``grad f_j(w)``::

    g    = mean_{j in S} (grad f_j(w) - y_j) + ybar  (+ weight_decay * w)
    ybar = ybar + sum_{j in S} (grad f_j(w) - y_j) / n ;   y_j = grad f_j(w)
    w    = w - lr * g

``g`` is unbiased for any table (``E_j[y_j] = ybar``), so the table starts at
zero and fills as examples are first seen (the review's "add gradients as
indices are first seen"; a first-epoch pass with ``lr=0`` gives its
``y_i = grad f_i(w_1)`` start instead). A repeated index in a batch counts in
``g`` as often as it appears, and its last gradient is stored.

**Driving it** (``per_example=True`` in
:class:`~largebatch.optim.classical_protocol.ClassicalStepProtocol`): no
closure; the driver passes the batch's example indices in ``[0, n)`` and their
gradients, one tensor per parameter in group order with the batch as leading
dimension (``None`` for a parameter without gradient), e.g. from
:func:`largebatch.diagnostics.per_example.per_example_gradients`::

    optimizer.step(indices=indices, per_example_grads=grads)

**Memory**: the table holds ``n`` copies of the parameters (``n * d`` numbers,
in ``table_dtype``, default the parameters' dtype): 4,000 examples of a
1,000-feature binary logistic regression (2,002 parameters) take 32 MB in
float32. That is why SAGA suits linear models and small networks.
Single process only: under DDP an example moves between ranks from one epoch
to the next, so every rank would need the whole table (``step`` raises).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from largebatch.optim._base import check_lr, check_non_negative
from largebatch.optim._classical import ClassicalOptimizer, check_positive_int
from largebatch.optim.classical_protocol import ClassicalStepProtocol


class SAGA(ClassicalOptimizer):
    """SAGA with a per-example gradient table (module docstring).

    Args:
        params: parameters or parameter groups.
        num_examples: ``n``, the size of the finite training set.
        lr: constant step size (``1/(3L)`` in the review; ``1/(2(cn + L))`` when the
            strong-convexity constant ``c`` is known).
        weight_decay: L2 coefficient added to the direction (exact, not tabulated).
        table_dtype: dtype of the table (default: each parameter's).
    """

    STATISTICS = ("examples_seen", "correction_norm")
    GLOBAL_KEYS = ("num_examples",)
    step_protocol = ClassicalStepProtocol(
        gradient_before_step=False, closure=None, per_example=True
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        num_examples: int,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        table_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, num_examples=num_examples, weight_decay=weight_decay, table_dtype=table_dtype
        )
        super().__init__(params, defaults)
        self.state["saga"] = {"seen": None}

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_positive_int("num_examples", group["num_examples"])
        check_non_negative("weight_decay", group["weight_decay"])
        dtype = group["table_dtype"]
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"Invalid table_dtype value: {dtype} (expected a float dtype)")

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_inputs(self, indices: Tensor, per_example_grads: Sequence[Tensor | None]) -> None:
        n = self.param_groups[0]["num_examples"]
        if not isinstance(indices, Tensor) or indices.ndim != 1 or indices.is_floating_point():
            raise ValueError(f"Invalid indices: {indices!r} (expected a 1-D integer tensor)")
        if len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= n:
            raise ValueError(f"Invalid indices: {indices.tolist()} (expected values in [0, {n}))")
        params = self._params()
        if len(per_example_grads) != len(params):
            raise ValueError(
                f"Invalid per_example_grads: {len(per_example_grads)} tensors for "
                f"{len(params)} parameters"
            )
        for i, (p, g) in enumerate(zip(params, per_example_grads)):
            if g is not None and g.shape != (len(indices), *p.shape):
                raise ValueError(
                    f"Invalid per_example_grads[{i}]: shape {tuple(g.shape)}, expected "
                    f"{(len(indices), *p.shape)} (batch of {len(indices)}, parameter {tuple(p.shape)})"
                )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("SAGA runs in a single process: its table covers every example")

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: None = None,
        *,
        indices: Tensor,
        per_example_grads: Sequence[Tensor | None],
    ) -> None:
        """One SAGA step on the batch ``indices`` with their per-example gradients."""
        if closure is not None:
            raise ValueError("Invalid closure: SAGA takes per-example gradients, not a closure")
        self._check_inputs(indices, per_example_grads)
        n = self.param_groups[0]["num_examples"]
        indices = indices.to(torch.long)
        # the last position of every distinct index: its gradient is what the table keeps
        unique, inverse = torch.unique(indices, return_inverse=True)
        positions = torch.arange(len(indices), device=indices.device)
        last = torch.zeros_like(unique).scatter_reduce_(0, inverse, positions, "amax")
        grads = dict(zip(self._params(), per_example_grads))
        correction_sqnorm = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                per_example = grads[p]
                if per_example is None:
                    continue
                state = self.state[p]
                if "table" not in state:
                    dtype = group["table_dtype"] or p.dtype
                    state["table"] = torch.zeros((n, *p.shape), dtype=dtype, device=p.device)
                    state["table_mean"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                table, mean = state["table"], state["table_mean"]
                per_example = per_example.to(table.dtype)
                correction = (per_example - table[indices.to(table.device)]).mean(0) + mean
                correction_sqnorm = (
                    correction_sqnorm.to(p.device) + correction.double().pow(2).sum()
                )
                stored = per_example[last]
                rows = unique.to(table.device)
                mean.add_((stored - table[rows]).sum(0), alpha=1.0 / n)
                table[rows] = stored
                direction = correction.to(p.dtype)
                if group["weight_decay"]:
                    direction.add_(p, alpha=group["weight_decay"])
                p.add_(direction, alpha=-group["lr"])
        seen = self.state["saga"]["seen"]
        if seen is None:
            seen = torch.zeros(n, dtype=torch.bool)
        seen = seen.clone()
        seen[unique.cpu()] = True
        self.state["saga"] = {"seen": seen}
        self._statistics = {
            "examples_seen": int(seen.sum()),
            "correction_norm": correction_sqnorm.sqrt(),
        }
