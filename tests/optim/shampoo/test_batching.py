"""The batched step against the unbatched arithmetic, and what batching buys: operations per step."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from largebatch.optim.shampoo import RootConfig, Shampoo, preconditioner
from shampoo.reference import ReferenceShampoo  # tests/optim is on sys.path

# Block size 4: blocked matrices, order-3 blocks, same-shape blocks of different
# parameters sharing buckets, a vector and a parameter above max_preconditioned_dim.
SHAPES = [(6, 10), (6, 10), (4, 4, 3), (3, 5, 5), (10,), (7, 3), (4, 4, 3), (2, 20)]
STEPS = 24

CONFIGS = {
    "adam-momentum-decay": dict(
        grafting=("adam", 0.999, 1e-8), betas=(0.9, 1.0), weight_decay=0.05, staleness=1
    ),
    "adagrad-no-momentum": dict(grafting=("adagrad", 0.0, 1e-10), betas=(0.0, 1.0), staleness=0),
    "rmsprop-nesterov-ema": dict(
        grafting=("rmsprop", 0.99, 1e-8), betas=(0.5, 0.95), nesterov=True, staleness=2
    ),
    "sgd-maximize": dict(grafting=("sgd", 0.0, 0.0), betas=(0.9, 1.0), maximize=True, staleness=1),
}


def grafting_config(name: str, beta2: float, epsilon: float):
    from largebatch.optim.shampoo import (
        AdaGradGraftingConfig,
        AdamGraftingConfig,
        RMSpropGraftingConfig,
        SGDGraftingConfig,
    )

    return {
        "adam": lambda: AdamGraftingConfig(beta2=beta2, epsilon=epsilon),
        "rmsprop": lambda: RMSpropGraftingConfig(beta2=beta2, epsilon=epsilon),
        "adagrad": lambda: AdaGradGraftingConfig(epsilon=epsilon),
        "sgd": SGDGraftingConfig,
    }[name]()


def run_both(config: dict, reference_overrides: dict | None = None):
    """Both optimizers on the same gradients; a late joiner (from step 6) and a parameter skipping every third step."""
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in initial]
    theirs = [torch.nn.Parameter(t.clone()) for t in initial]
    defaults = dict(lr=0.05, epsilon=1e-3, weight_decay=0.0, nesterov=False, maximize=False)
    settings = {**defaults, **config}
    roots = RootConfig(compute_dtype=torch.float64)
    optimizer = Shampoo(
        ours,
        lr=settings["lr"],
        betas=settings["betas"],
        epsilon=settings["epsilon"],
        weight_decay=settings["weight_decay"],
        nesterov=settings["nesterov"],
        maximize=settings["maximize"],
        grafting=grafting_config(*settings["grafting"]),
        max_preconditioner_dim=4,
        max_preconditioned_dim=16,
        precondition_frequency=3,
        staleness=settings["staleness"],
        start_preconditioning_step=4,
        asynchronous=False,
        factor_dtype=torch.float64,
        roots=roots,
    )
    reference = ReferenceShampoo(
        theirs,
        block=4,
        max_preconditioned_dim=16,
        frequency=3,
        start=4,
        roots=roots,
        **{**settings, **(reference_overrides or {})},
    )
    trajectories = []
    for step in range(1, STEPS + 1):
        for index, (a, b) in enumerate(zip(ours, theirs)):
            joined = index != 1 or step >= 6
            skipped = index == 3 and step % 3 == 0
            grad = torch.randn(a.shape, generator=generator, dtype=torch.float64)
            a.grad = b.grad = grad if joined and not skipped else None
        optimizer.step()
        reference.step()
        trajectories.append(
            ([p.detach().clone() for p in ours], [p.detach().clone() for p in theirs])
        )
    return trajectories


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_batched_step_matches_the_unbatched_arithmetic(config):
    for ours, theirs in run_both(config):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_buckets_split_inside_a_parameter_give_the_same_steps(monkeypatch):
    """One 4 x 4 block per bucket: the blocks of a tile group move one by one."""
    monkeypatch.setattr(preconditioner, "MAX_BUCKET_NUMEL", 16)
    for ours, theirs in run_both(CONFIGS["adam-momentum-decay"]):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_comparison_detects_a_relative_error_of_1e_8():
    """Negative control: the reference with the grafting epsilon doubled (1e-8 -> 2e-8)."""
    config = CONFIGS["adam-momentum-decay"]
    ours, theirs = run_both(config, {"grafting": ("adam", 0.999, 2e-8)})[-1]
    assert any(not torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(ours, theirs))


# --- operations per step ----------------------------------------------------------------


class OperationCounter(TorchDispatchMode):
    """Counts the aten operations that compute something (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def operations_per_step(shapes: list[tuple[int, ...]]) -> int:
    """Operations of a steady preconditioned step (no root refresh) of Shampoo on ``shapes``."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer = Shampoo(
        params,
        max_preconditioner_dim=8,
        precondition_frequency=10**9,
        start_preconditioning_step=1,
        asynchronous=False,
        cuda_graphs=False,
    )
    optimizer.step()
    with OperationCounter() as counter:
        optimizer.step()
    return counter.count


def test_blocks_of_one_shape_cost_no_operations_and_a_bucket_costs_its_products_and_a_rescale():
    base = [(8,), (8, 8)]
    one_bucket = operations_per_step(base)
    # 30 more 8 x 8 blocks (3 parameters of 10 blocks): the same bucket, the same operations.
    assert operations_per_step(base + [(80, 8)] * 3) == one_bucket
    # Each new block shape is a bucket: two statistics products, two preconditioning
    # products and one per-block rescale (the unbatched step paid about ten per block).
    shapes = [(8, 4), (8, 5), (8, 6), (8, 7)]
    extra = [operations_per_step(base + shapes[:n]) - one_bucket for n in (1, 2, 3, 4)]
    assert extra == [5, 10, 15, 20], extra
