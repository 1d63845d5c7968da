"""Per-example gradients and batch statistics against a plain loop of single-example backward passes.

* ``per_example_gradients`` (``vmap`` over ``grad``) equals one ``autograd.grad``
  per example (float64), for single examples and for groups, whatever the chunking.
* ``gradient_statistics`` equals the three tests' variances computed from those
  gradients in float64, with the mean given or computed (one chunk, or a second
  pass over several), and its mean is the batch gradient.
* Group estimates are unbiased: over random groupings they average to the
  per-example value; a wrong rescaling would not (negative control).
* Under a 2-process gloo group the statistics of the shards (by hooks, the default
  for this model) equal those of the union (by ``vmap``).
* Batch norm in train mode, a group size that does not divide the batch and
  foreign parameters are refused.
"""

from __future__ import annotations

import pytest
import torch
from gloo_group import run_in_gloo_group
from torch import nn
from torch.nn import functional as F

from largebatch.diagnostics.per_example import gradient_statistics, per_example_gradients


def problem(n: int = 24):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def looped_gradients(model, x, y, group_size=1) -> torch.Tensor:
    """One flat gradient per group of ``group_size`` consecutive examples, by autograd."""
    rows = []
    for start in range(0, len(x), group_size):
        loss = F.cross_entropy(model(x[start : start + group_size]), y[start : start + group_size])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_per_example_gradients_equal_a_loop_of_backward_passes(group_size, chunk_size):
    model, x, y = problem()
    grads = per_example_gradients(
        model, F.cross_entropy, x, y, group_size=group_size, chunk_size=chunk_size
    )
    flat = torch.cat([g.reshape(len(g), -1) for g in grads], dim=1)
    torch.testing.assert_close(
        flat, looped_gradients(model, x, y, group_size), rtol=1e-12, atol=1e-14
    )
    assert [g.shape[1:] for g in grads] == [p.shape for p in model.parameters()]


def reference_statistics(G: torch.Tensor, group_size: int = 1) -> dict[str, float]:
    """The three tests' per-example variances from sample gradients ``G`` (rows), by definition."""
    K, mean = len(G), G.mean(0)
    projections = G @ mean
    orthogonal = G - projections[:, None] / (mean @ mean) * mean
    return {
        "trace_covariance": group_size * float(((G - mean) ** 2).sum() / (K - 1)),
        "inner_product_variance": group_size
        * float(((projections - mean @ mean) ** 2).sum() / (K - 1)),
        "orthogonal_variance": group_size * float((orthogonal**2).sum() / (K - 1)),
    }


@pytest.mark.parametrize("mean_given", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 100])
@pytest.mark.parametrize("group_size", [1, 2])
def test_statistics_equal_their_definitions(mean_given, chunk_size, group_size):
    model, x, y = problem()
    loss = F.cross_entropy(model(x), y)
    batch_gradient = torch.autograd.grad(loss, list(model.parameters()))
    statistics, mean = gradient_statistics(
        model,
        F.cross_entropy,
        x,
        y,
        mean_gradient=batch_gradient if mean_given else None,
        group_size=group_size,
        chunk_size=chunk_size,
    )
    expected = reference_statistics(looped_gradients(model, x, y, group_size), group_size)
    for name, value in expected.items():
        assert getattr(statistics, name) == pytest.approx(value, rel=1e-10), name
    assert statistics.batch_size == len(x) and statistics.num_samples == len(x) // group_size
    for m, g in zip(mean, batch_gradient):
        torch.testing.assert_close(m, g, rtol=1e-12, atol=1e-14)


def test_norm_test_alone_skips_the_projections():
    model, x, y = problem()
    statistics, _ = gradient_statistics(model, F.cross_entropy, x, y, projections=False)
    expected = reference_statistics(looped_gradients(model, x, y))
    assert statistics.trace_covariance == pytest.approx(expected["trace_covariance"], rel=1e-10)
    assert statistics.sum_projections_sq != statistics.sum_projections_sq  # NaN: not computed


def test_group_estimates_are_unbiased_over_random_groupings():
    model, x, y = problem(n=24)
    exact = reference_statistics(looped_gradients(model, x, y))["trace_covariance"]
    generator = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(300):
        order = torch.randperm(len(x), generator=generator)
        statistics, _ = gradient_statistics(
            model, F.cross_entropy, x[order], y[order], group_size=4, projections=False
        )
        estimates.append(statistics.trace_covariance)
    estimates = torch.tensor(estimates)
    error = 4 * estimates.std() / len(estimates) ** 0.5
    assert abs(estimates.mean() - exact) <= error
    assert abs(estimates.mean() / 4 - exact) > error  # negative control: without the rescaling


def test_refused_inputs():
    model, x, y = problem()
    with pytest.raises(ValueError, match="Invalid group_size: 5"):
        gradient_statistics(model, F.cross_entropy, x, y, group_size=5)
    with pytest.raises(ValueError, match="not parameters of the model"):
        per_example_gradients(model, F.cross_entropy, x, y, params=[nn.Parameter(torch.ones(2))])
    normed = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="1 is a batch norm in train mode"):
        per_example_gradients(normed, F.cross_entropy, x, y)
    normed.eval()
    assert per_example_gradients(normed, F.cross_entropy, x, y)[0].shape == (24, 6, 4)


WORLD = 2
SHARDS = [slice(0, 12), slice(12, 24)]


def worker(rank: int, out: str) -> None:
    model, x, y = problem()
    shard = SHARDS[rank]
    computed, mean = gradient_statistics(model, F.cross_entropy, x[shard], y[shard], chunk_size=5)
    ddp = nn.parallel.DistributedDataParallel(model)
    F.cross_entropy(ddp(x[shard]), y[shard]).backward()
    given, _ = gradient_statistics(
        model,
        F.cross_entropy,
        x[shard],
        y[shard],
        mean_gradient=[p.grad for p in model.parameters()],
    )
    torch.save({"computed": computed, "given": given, "mean": mean}, f"{out}/rank{rank}.pt")


def test_statistics_under_gloo_equal_the_union(tmp_path):
    run_in_gloo_group(worker, tmp_path, WORLD)
    model, x, y = problem()
    expected, mean = gradient_statistics(model, F.cross_entropy, x, y, method="vmap")
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for statistics in (saved["computed"], saved["given"]):
            assert statistics.num_samples == 24
            for name in ("trace_covariance", "inner_product_variance", "orthogonal_variance"):
                assert getattr(statistics, name) == pytest.approx(
                    getattr(expected, name), rel=1e-10
                )
        for m, e in zip(saved["mean"], mean):
            torch.testing.assert_close(m, e, rtol=1e-12, atol=1e-14)
