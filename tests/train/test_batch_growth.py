"""Batch-size controllers: their rules on known statistics, their state, and dynamic sampling theory.

* Each rule's proposal equals its formula on hand-made statistics (rounded up
  to ``multiple_of``, never shrinking, capped); the state round-trips.
* Dynamic sampling with the norm test on a strongly convex problem (streaming
  least squares, exact per-example statistics from ``gradient_statistics``)
  converges linearly per iteration (faster than Thm 5.1's ``1 - a c / 2``), and
  its total sample count grows like ``1/eps`` (slope 1 of log samples against
  log 1/gap). Negative controls: without growth it stalls; geometric growth
  faster than Thm 5.3 allows spends samples like ``eps^-2``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.diagnostics.per_example import GradientStatistics, gradient_statistics
from largebatch.train.batch_growth import (
    GeometricGrowth,
    IncreaseInsteadOfDecay,
    InnerProductTest,
    NormTest,
    make_controller,
)


def statistics(trace: float, mean_sqnorm: float, batch: int, ip: float = 0.0, orth: float = 0.0):
    """Statistics with the given per-example variances (built from their sums)."""
    k = batch
    s1 = trace * (k - 1) + k * mean_sqnorm
    s3 = ip * (k - 1) + k * mean_sqnorm**2
    built = GradientStatistics(k, 1, mean_sqnorm, s1, s3)
    if orth:  # S1 - S3 / |g|^2 = orth (k - 1): solve for S1 with S3 fixed
        built.sum_sqnorms = orth * (k - 1) + s3 / mean_sqnorm
    return built


def test_norm_test_keeps_a_passing_batch_and_proposes_the_predicted_size():
    controller = NormTest(initial=16, max_batch_size=1024, theta=0.5, multiple_of=8)
    # tr/b = 4/16 = 0.25 <= theta^2 |g|^2 = 0.25: passes
    assert controller.update(statistics(4.0, 1.0, 16)) == 16
    assert controller.record()["test_ratio"] == pytest.approx(1.0)
    # tr = 10: needs ceil(10 / 0.25) = 40, a multiple of 8
    assert controller.update(statistics(10.0, 1.0, 16)) == 40
    assert controller.proposed_batch_size == pytest.approx(40.0)
    # 41 -> 48 (rounded up), then capped at 1024, never shrinking
    assert controller.update(statistics(10.25, 1.0, 40)) == 48
    assert controller.update(statistics(1e9, 1.0, 48)) == 1024
    assert controller.update(statistics(0.0, 1.0, 1024)) == 1024
    assert controller.update(statistics(1.0, 0.0, 1024)) == 1024  # zero gradient: the maximum


def test_norm_test_geometric_floor():
    controller = NormTest(initial=10, max_batch_size=10_000, theta=0.5, min_growth=2.0)
    sizes = [controller.update(statistics(0.0, 1.0, 10)) for _ in range(3)]
    assert sizes == [20, 40, 80]


def test_testing_every_few_steps():
    controller = NormTest(initial=16, max_batch_size=1024, theta=0.5, every=3)
    due = []
    for _ in range(6):
        due.append(controller.needs_statistics)
        controller.update(statistics(10.0, 1.0, 16) if due[-1] else None)
    assert due == [True, False, False, True, False, False]
    assert controller.batch_size == 40
    with pytest.raises(ValueError, match="Invalid statistics: None"):
        controller.update()  # step 6 is tested


def test_inner_product_test_takes_the_larger_of_the_two_proposals():
    ip_only = InnerProductTest(initial=4, max_batch_size=10_000, theta=0.5)
    # Var_ip = 30, |g|^2 = 2: needs 30 / (0.25 * 4) = 30
    assert ip_only.update(statistics(1.0, 2.0, 4, ip=30.0)) == 30
    augmented = InnerProductTest(initial=4, max_batch_size=10_000, theta=0.5, nu=0.5)
    # orthogonal variance 100: needs 100 / (0.25 * 2) = 200 > 30
    assert augmented.update(statistics(1.0, 2.0, 4, ip=30.0, orth=100.0)) == 200
    assert augmented.record()["test_ratio"] == pytest.approx(50.0)


def test_geometric_growth_and_increase_instead_of_decay():
    geometric = GeometricGrowth(initial=10, max_batch_size=100, factor=1.5)
    assert [geometric.update() for _ in range(6)] == [15, 23, 34, 51, 76, 100]
    swap = IncreaseInsteadOfDecay(initial=10, max_batch_size=100, milestones=[2, 4], factor=5)
    sizes, scales = [], []
    for _ in range(5):
        sizes.append(swap.update())
        scales.append(swap.lr_scale)
    assert sizes == [10, 50, 50, 100, 100]
    assert scales == [1.0, 1.0, 1.0, pytest.approx(0.4), pytest.approx(0.4)]  # 250 wanted


def test_state_round_trip_and_factory():
    controller = make_controller("norm-test", initial=4, max_batch_size=64, theta=0.3)
    controller.update(statistics(5.0, 1.0, 4))
    resumed = make_controller("norm-test", initial=4, max_batch_size=64, theta=0.3)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.record() == controller.record() and resumed.steps == 1
    assert resumed.update(statistics(9.0, 1.0, 56)) == controller.update(statistics(9.0, 1.0, 56))
    with pytest.raises(ValueError, match="saved by 'norm-test'"):
        GeometricGrowth(4, 64).load_state_dict(controller.state_dict())
    with pytest.raises(ValueError, match="Invalid batch growth: 'nrom-test'"):
        make_controller("nrom-test", initial=4, max_batch_size=64)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("norm-test", {"theta": 0.0}, "Invalid theta value: 0.0"),
        ("norm-test", {"theta": -1.0}, "Invalid theta value: -1.0"),
        ("inner-product-test", {"nu": 0}, "Invalid nu value: 0"),
        ("norm-test", {"min_growth": 0.5}, "Invalid min_growth: 0.5"),
        ("geometric", {"factor": 1.0}, "Invalid factor: 1.0"),
        ("increase-instead-of-decay", {"milestones": [3, 2]}, r"Invalid milestones: \(3, 2\)"),
        ("norm-test", {"initial": 0}, "Invalid initial value: 0"),
        ("norm-test", {"max_batch_size": 2}, "Invalid max_batch_size: 2"),
        ("norm-test", {"multiple_of": 3}, "multiples of multiple_of=3"),
        ("norm-test", {"every": 0}, "Invalid every value: 0"),
    ],
)
def test_bad_options_raise_naming_the_value(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_controller(name, **{"initial": 4, "max_batch_size": 64, **options})


def test_adaptive_tests_need_statistics():
    with pytest.raises(ValueError, match="Invalid statistics: None"):
        NormTest(4, 64).update()
    with pytest.raises(ValueError, match="num_samples=1"):
        NormTest(4, 64).update(statistics(1.0, 1.0, 1))


CURVATURES = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
NOISE = 0.5
LR = 1.0  # 1 / L


def dynamic_sampling(controller, seed: int, target: float, max_iter: int):
    """Streaming least squares ``1/2 (x^T w - y)^2``, ``x ~ N(0, H)``, ``y = x^T w* + noise``.

    ``F(w) - F* = 1/2 (w - w*)^T H (w - w*)`` exactly; gradient steps of size 1/L
    on batches of the controller's sizes. Returns gaps and cumulative samples.
    """
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(len(CURVATURES), 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)  # w* = 0

    def loss_fn(output, target):
        return 0.5 * F.mse_loss(output.squeeze(-1), target)

    gaps, samples, total = [], [], 0
    for _ in range(max_iter):
        batch = controller.batch_size
        x = torch.randn(batch, len(CURVATURES), generator=generator, dtype=torch.float64)
        x *= CURVATURES.sqrt()
        y = NOISE * torch.randn(batch, generator=generator, dtype=torch.float64)
        if controller.needs_statistics:
            measured, mean = gradient_statistics(
                model, loss_fn, x, y, projections=False, chunk_size=1 << 16
            )
        else:
            measured, mean = None, torch.autograd.grad(loss_fn(model(x), y), [model.weight])
        with torch.no_grad():
            model.weight -= LR * mean[0]
        controller.update(measured)
        total += batch
        error = model.weight.detach()[0]
        gaps.append(0.5 * float((CURVATURES * error * error).sum()))
        samples.append(total)
        if gaps[-1] < target:
            break
    return np.array(gaps), np.array(samples)


def samples_exponent(runs) -> float:
    """Slope of log(samples) against log(1/gap), pooled over runs (1 means O(1/eps))."""
    x = np.concatenate([np.log(1 / gaps[2:]) for gaps, _ in runs])
    y = np.concatenate([np.log(samples[2:]) for _, samples in runs])
    return float(np.polyfit(x, y, 1)[0])


def test_norm_test_converges_linearly_with_order_one_over_eps_samples():
    c = float(CURVATURES.min())
    runs = [
        dynamic_sampling(NormTest(4, 10**7, theta=0.5), seed, target=1e-5, max_iter=60)
        for seed in range(3)
    ]
    for gaps, _ in runs:
        assert gaps[-1] < 1e-5
        rate = np.polyfit(np.arange(len(gaps)), np.log(gaps), 1)[0]
        assert rate < math.log(1 - LR * c / 2)  # Thm 5.1's rho
    exponent = samples_exponent(runs)
    assert 0.8 < exponent < 1.2, exponent

    stalled, _ = dynamic_sampling(NormTest(4, 10**7, theta=100.0), 0, target=1e-5, max_iter=60)
    assert stalled[-20:].min() > 1e-4  # no growth: the fixed-batch noise floor
    too_fast = [
        dynamic_sampling(GeometricGrowth(1, 10**8, factor=4.0), seed, target=0.0, max_iter=11)
        for seed in range(3)
    ]
    assert samples_exponent(too_fast) > 1.4  # tau = 4 > 1/(1 - a c / 2): more than O(1/eps)
