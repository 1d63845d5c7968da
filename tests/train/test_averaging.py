"""Iterate averaging against the stationary theory of SG on a noisy quadratic, and batch-norm recompute.

With a constant step ``a`` on ``F = 1/2 sum_i h_i w_i^2`` and gradient noise
``sigma``, each coordinate of the iterate is an AR(1) process with coefficient
``r_i = 1 - a h_i`` and stationary variance ``v_i = a^2 sigma^2 / (1 - r_i^2)``.
Exactly, in the stationary regime:

* the uniform (Polyak-Ruppert) mean of ``K`` consecutive iterates has variance
  ``v_i / K^2 (K + 2 sum_{j<K} (K - j) r_i^j)``;
* an EMA with decay ``b`` has ``v_i (1 - b)(1 + r_i b) / ((1 + b)(1 - r_i b))``.

Monte Carlo over 4,000 replicas matches the predicted ratio of averaged to
last-iterate gap; the i.i.d. formula ``1/K`` (negative control) does not.
Batch-norm statistics are recomputed for the averaged weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from classical_problems import NoisyQuadratic
from torch import nn

from largebatch.train.averaging import AveragingConfig, IterateAverage

CURVATURES = [0.5, 1.0, 2.0]
SIGMA, LR, REPLICAS = 1.0, 0.2, 4000
BURN_IN, WINDOW = 150, 100


def run(config: AveragingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Gaps of the last iterate and of the average, per replica, after ``BURN_IN + WINDOW`` steps."""
    problem = NoisyQuadratic(CURVATURES, SIGMA, REPLICAS, seed=1)
    optimizer = torch.optim.SGD(problem.parameters(), lr=LR)
    average = IterateAverage(problem, config)
    for step in range(1, BURN_IN + WINDOW + 1):
        problem.noisy_gradient_()
        optimizer.step()
        average.update(problem, step)
    return problem.gaps().numpy(), problem.gaps(average.module.w.detach()).numpy()


def stationary(h: float) -> tuple[float, float]:
    r = 1 - LR * h
    return r, LR**2 * SIGMA**2 / (1 - r * r)


def predicted_ratio(variance_factor) -> float:
    """``E gap(average) / E gap(last)`` given each coordinate's variance factor ``f(r)``."""
    numerator = sum(h * stationary(h)[1] * variance_factor(stationary(h)[0]) for h in CURVATURES)
    return numerator / sum(h * stationary(h)[1] for h in CURVATURES)


def polyak_factor(r: float) -> float:
    K = WINDOW
    return (K + 2 * sum((K - j) * r**j for j in range(1, K))) / K**2


def ema_factor(decay: float):
    return lambda r: (1 - decay) * (1 + r * decay) / ((1 + decay) * (1 - r * decay))


def measured_ratio(last: np.ndarray, averaged: np.ndarray) -> float:
    return float(averaged.mean() / last.mean())


def test_polyak_average_beats_the_last_iterate_by_the_predicted_factor():
    last, averaged = run(AveragingConfig("polyak", start=BURN_IN))
    predicted = predicted_ratio(polyak_factor)
    assert predicted < 0.2  # averaging removes most of the stationary noise
    assert measured_ratio(last, averaged) == pytest.approx(predicted, rel=0.06)
    iid = 1 / WINDOW  # negative control: ignoring the correlation of the iterates
    assert measured_ratio(last, averaged) != pytest.approx(iid, rel=0.5)


def test_ema_beats_the_last_iterate_by_the_predicted_factor():
    decay = 0.95
    last, averaged = run(AveragingConfig("ema", start=BURN_IN - WINDOW, decay=decay))
    predicted = predicted_ratio(ema_factor(decay))
    assert measured_ratio(last, averaged) == pytest.approx(predicted, rel=0.06)
    assert measured_ratio(last, averaged) != pytest.approx(
        predicted_ratio(ema_factor(0.8)), rel=0.2
    )


def test_start_every_and_state_round_trip():
    model = nn.Linear(2, 1)
    average = IterateAverage(model, AveragingConfig("polyak", start=3, every=2))
    folded = []
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.fill_(float(step))
        folded.append(average.update(model, step))
    assert folded == [False, False, False, True, False, True, False, True]
    assert average.num_averaged == 3
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), (4 + 6 + 8) / 3))

    resumed = IterateAverage(model, AveragingConfig("polyak", start=3, every=2))
    resumed.load_state_dict(copy.deepcopy(average.state_dict()))
    for target in (average, resumed):
        with torch.no_grad():
            model.weight.fill_(20.0)
        target.update(model, 10)
    torch.testing.assert_close(resumed.module.weight, average.module.weight)
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), (4 + 6 + 8 + 20) / 4))


@pytest.mark.parametrize("kind", ["polyak", "ema"])
def test_folding_equals_torchs_averaged_model(kind):
    """The average (its own fold, which reads no tensor) equals ``AveragedModel.update_parameters``
    step by step, buffers and a resume included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    config = AveragingConfig(kind, decay=0.7)
    average = IterateAverage(model, config)
    fold = torch.optim.swa_utils.get_ema_multi_avg_fn(0.7) if kind == "ema" else None
    reference = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=fold, use_buffers=False)
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # new running statistics
        average.update(model, step)
        reference.update_parameters(model)
        if step == 3:
            average = IterateAverage(model, config)
            average.load_state_dict(copy.deepcopy(reference.state_dict()))
    assert average.num_averaged == int(reference.n_averaged) == 6
    for mine, theirs in zip(
        average.averaged.state_dict().values(), reference.state_dict().values()
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(average.module[0].weight, model[0].weight)  # it did average


def test_batch_norm_statistics_are_recomputed_for_the_averaged_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x = torch.randn(64, 3)
    model(x)  # running statistics of the first weights
    average = IterateAverage(model, AveragingConfig("polyak"))
    average.update(model, 1)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    average.update(model, 2)
    norm = average.module[1]
    stale = norm.running_mean.clone()
    average.recompute_batch_norm([(x[:32], None), (x[32:], None)])
    features = average.module[0](x).detach()
    expected_mean = (features[:32].mean(0) + features[32:].mean(0)) / 2
    expected_var = (features[:32].var(0) + features[32:].var(0)) / 2
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)
    assert not torch.allclose(stale, expected_mean)  # the copied statistics were not those
    assert (
        average.module.training is False or average.module.training is True
    )  # mode restored by update_bn


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "swa"}, "Invalid averaging kind: 'swa'"),
        ({"start": -1}, "Invalid averaging start: -1"),
        ({"decay": 1.0}, "Invalid averaging decay: 1.0"),
        ({"every": 0}, "Invalid averaging every: 0"),
    ],
)
def test_bad_config_raises_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        AveragingConfig(**options)
