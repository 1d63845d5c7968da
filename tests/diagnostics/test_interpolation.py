"""Checkpoint interpolation and filter-normalised slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from largebatch.diagnostics import (
    evaluate,
    filter_normalized_direction,
    interpolate_checkpoints,
    loss_slice,
)
from largebatch.tasks import accuracy


def classifier(seed, batch_norm=False):
    torch.manual_seed(seed)
    layers = (
        [nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU()]
        if batch_norm
        else [nn.Linear(5, 8), nn.ReLU()]
    )
    return nn.Sequential(*layers, nn.Linear(8, 3)).double()


def data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator)
    return [(X[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def trained_state(model, batches, steps=30):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        for inputs, targets in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("batch_norm", [False, True])
def test_endpoints_equal_the_endpoint_losses(batch_norm):
    splits = {"train": data(60, 0), "test": data(40, 1)}
    model_a, model_b = classifier(0, batch_norm), classifier(1, batch_norm)
    state_a = trained_state(model_a, splits["train"], steps=3)
    state_b = trained_state(model_b, splits["train"], steps=5)
    probe = classifier(2, batch_norm)
    before = {name: value.clone() for name, value in probe.state_dict().items()}
    result = interpolate_checkpoints(
        probe, state_a, state_b, F.cross_entropy, splits, metrics={"accuracy": accuracy}
    )
    assert result.alphas[0] == -1.0 and result.alphas[-1] == 2.0 and len(result.alphas) == 25
    for alpha, model in ((0.0, model_a), (1.0, model_b)):
        i = result.alphas.index(alpha)
        for split, batches in splits.items():
            expected = evaluate(model, F.cross_entropy, batches, {"accuracy": accuracy})
            assert result.curves[split]["loss"][i] == expected["loss"]
            assert result.curves[split]["accuracy"][i] == expected["accuracy"]
    for name, value in probe.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_loss_of_a_quadratic_is_an_exact_parabola_in_alpha():
    X = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randn(50, dtype=torch.float64)
    model = nn.Linear(5, 1).double()
    state_a = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    state_b = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    result = interpolate_checkpoints(
        model, state_a, state_b, lambda o, t: ((o.squeeze(-1) - t) ** 2).mean(), {"train": [(X, y)]}
    )
    alphas, losses = np.array(result.alphas), np.array(result.curves["train"]["loss"])
    coefficients = np.polyfit(alphas[[0, 12, 24]], losses[[0, 12, 24]], 2)
    np.testing.assert_allclose(np.polyval(coefficients, alphas), losses, rtol=1e-10)


def test_batch_norm_statistics_interpolated_or_recomputed():
    splits = {"train": data(64, 0)}
    state_a = trained_state(classifier(0, True), splits["train"], steps=2)
    state_b = trained_state(classifier(1, True), splits["train"], steps=2)
    kwargs = {"alphas": [0.5]}
    mixed = interpolate_checkpoints(
        classifier(2, True), state_a, state_b, F.cross_entropy, splits, **kwargs
    )
    recomputed = interpolate_checkpoints(
        classifier(2, True),
        state_a,
        state_b,
        F.cross_entropy,
        splits,
        batch_norm="recompute",
        **kwargs,
    )
    # Reference: the midpoint weights, with running statistics = the average over the
    # train batches of each batch's mean and (unbiased) variance.
    reference = classifier(2, True)
    midpoint = {
        k: 0.5 * v + 0.5 * state_b[k] if v.is_floating_point() else v for k, v in state_a.items()
    }
    reference.load_state_dict(midpoint)
    with torch.no_grad():
        features = [reference[0](inputs) for inputs, _ in splits["train"]]
        reference[1].running_mean.copy_(torch.stack([f.mean(0) for f in features]).mean(0))
        reference[1].running_var.copy_(torch.stack([f.var(0) for f in features]).mean(0))
    expected = evaluate(reference, F.cross_entropy, splits["train"])["loss"]
    assert recomputed.curves["train"]["loss"][0] == pytest.approx(expected, rel=1e-9)
    assert mixed.curves["train"]["loss"][0] != pytest.approx(expected, rel=1e-3)


def test_filter_normalized_direction_matches_weight_norms_per_filter():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 3))
    direction = filter_normalized_direction(model, seed=0)
    for param, d in zip(model.parameters(), direction):
        if param.dim() == 1:
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(
                d.flatten(1).norm(dim=1), param.detach().flatten(1).norm(dim=1)
            )
    copied = filter_normalized_direction(model, seed=0, one_dim="copy")
    torch.testing.assert_close(copied[1], model[0].bias.detach())
    again = filter_normalized_direction(model, seed=0)
    torch.testing.assert_close(again[0], direction[0], rtol=0, atol=0)


def test_slices_pass_through_the_model_and_follow_the_direction():
    batches = data(48, 3)
    model = classifier(4)
    base = evaluate(model, F.cross_entropy, batches)["loss"]
    d1 = filter_normalized_direction(model, seed=1)
    d2 = filter_normalized_direction(model, seed=2)
    line = loss_slice(model, F.cross_entropy, batches, [d1], coordinates=[-0.5, 0.0, 0.5])
    assert line.values["loss"].shape == (3,)
    assert line.values["loss"][1] == base
    moved = classifier(4)
    with torch.no_grad():
        for param, d in zip(moved.parameters(), d1):
            param.add_(0.5 * d)
    assert line.values["loss"][2] == pytest.approx(
        evaluate(moved, F.cross_entropy, batches)["loss"], rel=1e-12
    )
    plane = loss_slice(model, F.cross_entropy, batches, [d1, d2], coordinates=[-0.5, 0.0, 0.5])
    assert plane.values["loss"].shape == (3, 3)
    np.testing.assert_allclose(plane.values["loss"][:, 1], line.values["loss"], rtol=1e-12)
    assert evaluate(model, F.cross_entropy, batches)["loss"] == base  # restored


def test_bad_arguments_raise():
    model = classifier(0)
    state = model.state_dict()
    with pytest.raises(ValueError, match="keys in only one"):
        interpolate_checkpoints(
            model, state, {"x": torch.zeros(1)}, F.cross_entropy, {"train": data(16, 0)}
        )
    with pytest.raises(ValueError, match="Invalid batch_norm: 'sometimes'"):
        interpolate_checkpoints(
            model, state, state, F.cross_entropy, {"train": data(16, 0)}, batch_norm="sometimes"
        )
    with pytest.raises(ValueError, match="Invalid one_dim: 'skip'"):
        filter_normalized_direction(model, one_dim="skip")
    with pytest.raises(ValueError, match="Invalid directions: expected 1 or 2, got 3"):
        loss_slice(model, F.cross_entropy, data(16, 0), [filter_normalized_direction(model)] * 3)
