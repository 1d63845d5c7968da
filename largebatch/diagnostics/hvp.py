"""Hessian-vector products of a model's loss on fixed data, by double backward.

:class:`HessianOperator` is the linear operator ``v -> H v`` that the spectrum
and trace estimators in :mod:`largebatch.diagnostics.hessian` consume. Vectors
are flat (one entry per parameter, in ``model.parameters()`` order).

Under ``torch.distributed`` each rank passes its own shard of the data and the
products are all-reduced, so ``H`` is the Hessian of the mean loss over the
union. ``torch.autograd.grad`` never fires DDP's all-reduce hooks, so a DDP
model is unwrapped and the reduction is done here explicitly. All ranks must
call the operator with the same vector (same seed in the estimators).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from largebatch.diagnostics.evaluation import (
    Batches,
    LossFn,
    all_reduce_sum,
    check_batches,
    fixed_function,
    flatten,
    on_device,
    trainable_parameters,
    unflatten,
    unwrap,
)


class HessianOperator:
    """``H v`` for the mean loss of ``model`` over ``batches``.

    Args:
        model: the network (a DDP wrapper is unwrapped).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss over the batch.
        batches: re-iterable ``(inputs, targets)`` batches yielding the same
            examples on every pass (see :func:`~largebatch.diagnostics.evaluation.fixed_subset`).
        params: the parameters to differentiate with respect to (default: all
            that require grad); pass a subset for a per-layer Hessian.
        train: evaluate in train mode (batch statistics, dropout) instead of eval
            mode. Running statistics are restored after every product.
        seed: re-seeds the RNG before every product, so dropout masks are the same
            each time and the operator stays linear and symmetric.

    Attributes:
        dim: the number of parameters (length of the vectors).
        num_products: products computed so far (the cost measure).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Batches,
        *,
        params: Iterable[nn.Parameter] | None = None,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        self.model = unwrap(model)
        self.loss_fn = loss_fn
        self.batches = check_batches(batches)
        self.params = trainable_parameters(self.model, params)
        self.train = train
        self.seed = seed
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.num_products = 0

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """``H @ vector``, returned in ``vector``'s dtype."""
        if vector.shape != (self.dim,):
            raise ValueError(f"Invalid vector shape: {tuple(vector.shape)}, expected ({self.dim},)")
        directions = unflatten(vector.to(self.device), self.params)
        total = torch.zeros(self.dim + 1, dtype=torch.float64, device=self.device)
        with fixed_function(self.model, train=self.train, seed=self.seed):
            for inputs, targets, n in on_device(self.batches, self.device):
                loss = self.loss_fn(self.model(inputs), targets)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                directional = sum(
                    (g * d).sum()
                    for g, d in zip(grads, directions)
                    if g is not None and g.requires_grad
                )
                if isinstance(directional, torch.Tensor):  # else the loss is linear here: H v = 0
                    products = torch.autograd.grad(directional, self.params, allow_unused=True)
                    products = [
                        torch.zeros_like(p) if h is None else h
                        for h, p in zip(products, self.params)
                    ]
                    total[:-1] += n * flatten(products).double()
                total[-1] += n
        all_reduce_sum(total)
        self.num_products += 1
        return (total[:-1] / total[-1]).to(vector.dtype)
