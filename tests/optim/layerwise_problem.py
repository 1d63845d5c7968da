"""A small network and fixed mini-batches on which LARS/LAMB trajectories are compared."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad


def make_problem(
    steps: int, *, dtype: torch.dtype = torch.float64, seed: int = 0, nonzero: bool = False
):
    """An MLP with a LayerNorm (1-D parameters) and ``steps`` regression mini-batches.

    ``nonzero`` perturbs the LayerNorm bias away from 0: the papers' ratios are 0 for a
    zero tensor (it would never move), where implementations use 1.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    if nonzero:
        with torch.no_grad():
            model[1].bias.normal_(0.0, 0.1, generator=generator)
    batches = [
        (
            torch.randn(16, 4, generator=generator, dtype=dtype),
            torch.randn(16, 3, generator=generator, dtype=dtype),
        )
        for _ in range(steps)
    ]
    return model, batches


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    inputs, targets = batch
    return F.mse_loss(model(inputs), targets)


def gradients(model: nn.Module, params: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
    """Gradients of the batch loss at ``params`` (for re-derivations outside any optimizer)."""
    inputs, targets = batch
    return grad(lambda p: F.mse_loss(functional_call(model, p, (inputs,)), targets))(params)


def flat_parameters(model_or_params) -> torch.Tensor:
    tensors = (
        model_or_params.values()
        if isinstance(model_or_params, dict)
        else model_or_params.parameters()
    )
    return torch.cat([t.detach().flatten() for t in tensors])


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches, scheduler=None
) -> list[torch.Tensor]:
    """One step per batch; the flattened parameters after every step."""
    trajectory = []
    for batch in batches:
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append(flat_parameters(model))
    return trajectory


def max_relative_error(trajectory: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest ``||x_t - y_t|| / ||y_t||`` over the steps."""
    assert len(trajectory) == len(reference)
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(trajectory, reference))
