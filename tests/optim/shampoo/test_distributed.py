"""Root computations shared across ranks: balanced, never all on one rank, identical results."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from largebatch.optim.shampoo import DistributedConfig, Shampoo
from largebatch.optim.shampoo.distributed import Topology, balanced_owners

WORLD_SIZE = 2


def train_small_model(
    distributed: DistributedConfig | None = None,
) -> tuple[torch.nn.Module, Shampoo]:
    """Deterministic training; under data parallelism every rank sees the same (reduced) gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6))
    # Block size 4 gives 19 blocks in 5 shapes; roots every 2 steps, asynchronous, 1 step stale.
    optimizer = Shampoo(
        model.parameters(),
        lr=0.01,
        max_preconditioner_dim=4,
        precondition_frequency=2,
        staleness=1,
        distributed=distributed,
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        inputs, targets = (
            torch.randn(32, 12, generator=generator),
            torch.randn(32, 6, generator=generator),
        )
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return model, optimizer


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        model, optimizer = train_small_model()
        result = {
            "params": [p.detach() for p in model.parameters()],
            "computed": optimizer.factors_computed,
            "owners": [report.owner for report in optimizer.root_report()],
            "computed_alone": train_small_model(DistributedConfig(enabled=False))[
                1
            ].factors_computed,
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_roots_and_match_a_single_process(tmp_path):
    reference_model, reference_optimizer = train_small_model()
    mp.spawn(run_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    for result in results:
        for param, expected in zip(result["params"], reference_model.parameters()):
            assert torch.equal(param, expected.detach())
    # Each rank computed only its share; together exactly the single process's work.
    total = reference_optimizer.factors_computed
    computed = [result["computed"] for result in results]
    assert all(0 < c < total for c in computed), computed
    assert sum(computed) == total
    assert [result["computed_alone"] for result in results] == [total, total]  # opted out
    assert results[0]["owners"] == results[1]["owners"]
    assert set(results[0]["owners"]) == {0, 1}


def test_owners_balance_the_cost():
    costs = [512.0**3, 512.0**3, 64.0**3, 64.0**3, 64.0**3, 8.0**3] + [4.0**3] * 10
    loads = [0.0, 0.0, 0.0]
    owners = balanced_owners(costs, loads)
    per_rank = [sum(c for c, o in zip(costs, owners) if o == rank) for rank in range(3)]
    assert per_rank == loads
    # Greedy largest-first is within 4/3 of the optimum, here max(cost) bounds the optimum.
    assert max(per_rank) <= 4 / 3 * max(max(costs), sum(costs) / 3)
    assert owners[:2] == [0, 1]  # the two big roots go to different ranks
    assert balanced_owners(costs, [0.0, 0.0, 0.0]) == owners  # deterministic on every rank


def test_an_explicit_config_needs_an_initialized_process_group():
    with pytest.raises(ValueError, match="not initialized"):
        Topology.resolve(DistributedConfig())
    assert Topology.resolve(DistributedConfig(enabled=False)).world_size == 1
