"""Diagnostics under a 2-process gloo group equal their single-process counterparts."""

from __future__ import annotations

import torch
from gloo_group import run_in_gloo_group
from torch import nn
from torch.nn import functional as F

from largebatch.diagnostics import GradientNormRecorder, HessianOperator, hutchinson_trace

WORLD = 2


def problem():
    """The same small network, data and probe vector in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(80, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (80,))
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    return model, X, y, vector


# Uneven shards (rank 0: 30 examples in two batches, rank 1: 50 in one) test the weighting.
HESSIAN_SHARDS = [[slice(0, 10), slice(10, 30)], [slice(30, 80)]]
# Equal shards for DDP gradients (DDP averages ranks with equal weights).
GRADIENT_SHARDS = [slice(0, 40), slice(40, 80)]


def worker(rank: int, out: str) -> None:
    model, X, y, vector = problem()
    batches = [(X[s], y[s]) for s in HESSIAN_SHARDS[rank]]
    ddp = nn.parallel.DistributedDataParallel(model)
    operator = HessianOperator(ddp, F.cross_entropy, batches)
    product = operator(vector)
    trace = hutchinson_trace(operator, num_probes=4, seed=1)

    recorder = GradientNormRecorder(ddp)
    shard = GRADIENT_SHARDS[rank]
    F.cross_entropy(ddp(X[shard]), y[shard]).backward()
    small, big = recorder.read()

    # Not recording: the hook only averages the gradients (as DDP's own hook).
    recorder.recording = False
    ddp.zero_grad()
    F.cross_entropy(ddp(X[shard]), y[shard]).backward()
    recorded_while_off = bool(recorder._local or recorder._averaged)
    averaged_grad = torch.cat([p.grad.flatten() for p in ddp.parameters()])
    torch.save(
        {
            "product": product,
            "trace": trace.trace,
            "small": small,
            "big": big,
            "recorded_while_off": recorded_while_off,
            "averaged_grad": averaged_grad,
        },
        f"{out}/rank{rank}.pt",
    )


def test_hvp_trace_and_gradient_norms_under_gloo(tmp_path):
    run_in_gloo_group(worker, tmp_path, WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model, X, y, vector = problem()
    union = [(X[s], y[s]) for shards in HESSIAN_SHARDS for s in shards]
    operator = HessianOperator(model, F.cross_entropy, union)
    expected = operator(vector)
    expected_trace = hutchinson_trace(operator, num_probes=4, seed=1).trace
    for result in results:
        torch.testing.assert_close(result["product"], expected, rtol=1e-10, atol=1e-12)
        assert abs(result["trace"] - expected_trace) <= 1e-9 * abs(expected_trace)

    local = []
    for shard in GRADIENT_SHARDS:
        model.zero_grad()
        F.cross_entropy(model(X[shard]), y[shard]).backward()
        local.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    mean_local_sqnorm = torch.stack([g.dot(g) for g in local]).mean()
    averaged = torch.stack(local).mean(0)
    for result in results:
        torch.testing.assert_close(result["small"], mean_local_sqnorm, rtol=1e-10, atol=0)
        torch.testing.assert_close(result["big"], averaged.dot(averaged), rtol=1e-10, atol=0)
        assert not result["recorded_while_off"]
        torch.testing.assert_close(result["averaged_grad"], averaged, rtol=1e-10, atol=1e-14)
