"""Newton-CG and SQN under a 2-process gloo group equal one process on the union of the shards.

Their gradients, Hessian-vector products and line-search losses come from
``torch.autograd.grad`` on each rank's shard, which DDP does not average; the
optimizers average them across ranks themselves. With equal shards the mean of
the ranks' means is the mean over the union, so every rank must end where a
single process on all the data ends.
"""

from __future__ import annotations

import torch
from gloo_group import run_in_gloo_group
from torch import nn
from torch.nn import functional as F

from largebatch.optim.newton_cg import NewtonCG
from largebatch.optim.quasi_newton import SQN

WORLD = 2
SHARDS = [slice(0, 30), slice(30, 60)]


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(60, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    return model, x, y


def newton_cg_weights(model, x, y) -> torch.Tensor:
    optimizer = NewtonCG(model.parameters(), max_cg=5, weight_decay=1e-2)
    for _ in range(3):
        optimizer.step(
            lambda: F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(x[::2]), y[::2])
        )
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def sqn_weights(model, gradient_model, x, y) -> torch.Tensor:
    """SQN with the gradient from ``gradient_model`` (DDP or plain) and pairs from local products."""
    optimizer = SQN(model.parameters(), lr=0.5, update_every=1, weight_decay=1e-2)
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(gradient_model(x), y).backward()
        hessian = (lambda: F.cross_entropy(model(x), y)) if optimizer.hessian_due else None
        optimizer.step(hessian_closure=hessian)
    assert optimizer.step_statistics()["pairs_stored"] >= 1
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def worker(rank: int, out: str) -> None:
    model, x, y = problem()
    shard = SHARDS[rank]
    newton = newton_cg_weights(model, x[shard], y[shard])
    model, _, _ = problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    sqn = sqn_weights(model, ddp, x[shard], y[shard])
    torch.save({"newton": newton, "sqn": sqn}, f"{out}/rank{rank}.pt")


def test_newton_cg_and_sqn_under_gloo_equal_one_process(tmp_path):
    run_in_gloo_group(worker, tmp_path, WORLD)
    model, x, y = problem()
    # each shard's Hessian sample x[::2] is one half of the union's x[::2]
    newton = newton_cg_weights(model, x, y)
    model, _, _ = problem()
    sqn = sqn_weights(model, model, x, y)
    local_model, _, _ = problem()
    local = newton_cg_weights(local_model, x[SHARDS[0]], y[SHARDS[0]])
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(saved["newton"], newton, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(saved["sqn"], sqn, rtol=1e-10, atol=1e-12)
    assert (local - newton).abs().max() > 1e-3  # negative control: one shard alone differs
