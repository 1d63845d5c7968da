"""ALTO against the reference package, a float64 re-derivation of the paper's Alg. 2, and LAMB.

The re-derivation uses the paper's two-buffer recursion for ``a`` (EMA of gradient
differences), so agreement also proves the one-buffer form the optimizer uses.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from largebatch.optim import create_optimizer
from largebatch.optim.alto import ALTO

STEPS = 50
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}


def make_problem(steps: int = STEPS, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A small MLP (with a LayerNorm) and a fixed sequence of regression mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    batches = [
        (
            torch.randn(32, 4, generator=generator, dtype=dtype),
            torch.randn(32, 2, generator=generator, dtype=dtype),
        )
        for _ in range(steps)
    ]
    return model, batches


def split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matrices, and 1-D parameters (biases, norm weights)."""
    params = list(model.parameters())
    return [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]


def gradient_at(model: nn.Module, params: dict, batch: tuple) -> dict:
    inputs, targets = batch
    return grad(lambda p: F.mse_loss(functional_call(model, p, (inputs,)), targets))(params)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(model, optimizer, batches, *, clip_norm: float | None = None) -> list[dict]:
    """Step once per batch; the parameters after every step."""
    trajectory = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.mse_loss(model(inputs), targets).backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        trajectory.append(snapshot(model))
    return trajectory


def assert_trajectories_close(actual, expected, **tolerance) -> None:
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected), start=1):
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], **(tolerance or TOLERANCE), msg=f"step {step}, {name}"
            )


def paper_alto(model, batches, *, lr, alpha, betas, weight_decay, eps, eps2, eps3, trust) -> list:
    """Alg. 2 in float64, one layer at a time; ``trust(name)`` and ``weight_decay(name)`` per layer."""
    beta1, beta2, beta3 = betas
    theta = snapshot(model)
    zeros = {n: torch.zeros_like(t) for n, t in theta.items()}
    diff_ema, previous, m, v = dict(zeros), dict(zeros), dict(zeros), dict(zeros)
    trajectory = []
    for k, batch in enumerate(batches, start=1):
        g = gradient_at(model, theta, batch)
        for n in theta:
            diff_ema[n] = beta1 * diff_ema[n] + (1 - beta1) * (g[n] - previous[n])
            previous[n] = g[n]
            extrapolated = g[n] + alpha * diff_ema[n]
            m[n] = beta2 * m[n] + (1 - beta2) * extrapolated
            v[n] = beta3 * v[n] + (1 - beta3) * extrapolated**2
            m_hat, v_hat = m[n] / (1 - beta2**k), v[n] / (1 - beta3**k)
            r = m_hat / (v_hat.sqrt() + eps) + weight_decay(n) * theta[n]
            ratio = 1.0
            if trust(n):
                phi = theta[n].norm() + eps3
                ratio = phi / (r.norm() + eps2 * phi)
            theta[n] = theta[n] - lr * ratio * r
        trajectory.append(dict(theta))
    return trajectory


PATHS = {
    "single_tensor": {"foreach": False},
    "foreach": {"foreach": True},
    "compiled": {"compiled": True},
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("alpha", "beta1"), [(-5.0, 0.99), (0.5, 0.01)])
def test_matches_paper_algorithm_2(path, alpha, beta1):
    """Default eps2/eps3 trust ratio on matrices; biases and norm weights: no decay, no ratio."""
    model, batches = make_problem()
    matrix_names = {name for name, p in model.named_parameters() if p.ndim > 1}
    hparams = dict(lr=1e-2, alpha=alpha, betas=(beta1, 0.9, 0.99), eps=1e-6, eps2=1e-6, eps3=1e-10)
    expected = paper_alto(
        model,
        batches,
        **hparams,
        weight_decay=lambda name: 1e-2 if name in matrix_names else 0.0,
        trust=lambda name: name in matrix_names,
    )
    matrices, vectors = split(model)
    groups = [
        {"params": matrices},
        {"params": vectors, "weight_decay": 0.0, "trust_ratio": False},
    ]
    optimizer = ALTO(groups, weight_decay=1e-2, **PATHS[path], **hparams)
    assert_trajectories_close(train(model, optimizer, batches), expected)


def test_alpha_zero_is_bias_corrected_lamb_with_the_paper_ratio():
    """With alpha = 0 the E term vanishes: Adam moments of g, bias correction, phi ratio."""
    model, batches = make_problem()
    lr, (beta2, beta3), wd, eps, eps2, eps3 = 1e-2, (0.9, 0.99), 1e-2, 1e-6, 1e-3, 1e-3
    theta, trajectory = snapshot(model), []
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    for k, batch in enumerate(batches, start=1):
        g = gradient_at(model, theta, batch)
        for n in theta:
            m[n] = beta2 * m[n] + (1 - beta2) * g[n]
            v[n] = beta3 * v[n] + (1 - beta3) * g[n] ** 2
            r = (m[n] / (1 - beta2**k)) / ((v[n] / (1 - beta3**k)).sqrt() + eps) + wd * theta[n]
            phi = theta[n].norm() + eps3
            theta[n] = theta[n] - lr * phi / (r.norm() + eps2 * phi) * r
        trajectory.append(dict(theta))
    optimizer = ALTO(
        model.parameters(),
        lr=lr,
        alpha=0.0,
        betas=(0.99, beta2, beta3),
        weight_decay=wd,
        eps=eps,
        eps2=eps2,
        eps3=eps3,
    )
    assert_trajectories_close(train(model, optimizer, batches), trajectory)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_follows_reference_package(dtype, rtol):
    """``e-optimizer-adaptor`` 0.1.0, with its conditions reproduced around our optimizer.

    The package clips the global gradient norm to 1 inside ``step`` (here: in the
    loop), uses ``|theta| / |r|`` (here: ``eps2 = eps3 = 0``) and applies no trust
    ratio where weight decay is 0 (here: ``trust_ratio=False`` on that group).
    """
    reference_alto = pytest.importorskip("ALTO").ALTO
    model, batches = make_problem(dtype=dtype)
    reference_model = copy.deepcopy(model)
    hparams = dict(lr=1e-2, betas=(0.99, 0.9, 0.99), eps=1e-6, weight_decay=1e-2)
    matrices, vectors = split(reference_model)
    reference = reference_alto(
        [{"params": matrices}, {"params": vectors, "weight_decay": 0}], alp=-5.0, **hparams
    )
    expected = train(reference_model, reference, batches)
    matrices, vectors = split(model)
    groups = [{"params": matrices}, {"params": vectors, "weight_decay": 0.0, "trust_ratio": False}]
    ours = ALTO(groups, alpha=-5.0, eps2=0.0, eps3=0.0, **hparams)
    actual = train(model, ours, batches, clip_norm=1.0)
    assert_trajectories_close(actual, expected, rtol=rtol, atol=rtol * 1e-2)


def test_first_step_moves_every_coordinate_by_lr():
    """At k = 1 bias correction gives m_hat / sqrt(v_hat) = sign(ghat) = sign(g) (|c| < 1)."""
    param = nn.Parameter(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64))
    param.grad = torch.tensor([1e-3, -4.0, 0.25], dtype=torch.float64)
    optimizer = ALTO([param], lr=0.1, weight_decay=0.0, eps=0.0, trust_ratio=False)
    optimizer.step()
    expected = torch.tensor([0.4, -1.9, 2.9], dtype=torch.float64)
    torch.testing.assert_close(param.detach(), expected, **TOLERANCE)


def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    model, batches = make_problem(steps=20)
    resumed_model = copy.deepcopy(model)
    uninterrupted = train(model, ALTO(model.parameters(), lr=1e-2), batches)
    first = ALTO(resumed_model.parameters(), lr=1e-2)
    train(resumed_model, first, batches[:10])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ALTO(resumed_model.parameters(), lr=1e-2)
    resumed.load_state_dict(torch.load(buffer))
    assert set(resumed.state[resumed_model[0].weight]) == {
        "step",
        "grad_ema",
        "exp_avg",
        "exp_avg_sq",
    }
    continued = train(resumed_model, resumed, batches[10:])
    assert_trajectories_close(continued, uninterrupted[10:], rtol=0.0, atol=0.0)


def test_lr_scheduler_changes_the_step():
    """Halving lr every step: with trust ratio off, step k moves by lr_k * |r_k| exactly."""
    param = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = ALTO([param], lr=0.8, alpha=0.0, weight_decay=0.0, eps=0.0, trust_ratio=False)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    positions = []
    for _ in range(4):
        param.grad = torch.ones(1, dtype=torch.float64)  # constant gradient: r = 1 every step
        optimizer.step()
        scheduler.step()
        positions.append(param.item())
    assert positions == pytest.approx([-0.8, -1.2, -1.4, -1.5], rel=1e-12)


def test_step_with_closure_returns_its_loss_and_skips_params_without_grad():
    model, batches = make_problem(steps=1)
    inputs, targets = batches[0]
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    optimizer = ALTO(model.parameters(), lr=1e-2)

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and math.isfinite(loss.item())
    assert torch.equal(model[0].weight, before) and model[0].weight not in optimizer.state
    assert model[3].weight in optimizer.state


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1e-3}, "learning rate: -0.001"),
        ({"betas": (1.0, 0.9, 0.99)}, "index 0: 1.0"),
        ({"betas": (0.99, -0.1, 0.99)}, "index 1: -0.1"),
        ({"betas": (0.99, 0.9, 1.5)}, "index 2: 1.5"),
        ({"betas": (0.9, 0.99)}, "betas"),
        ({"alpha": -101.0}, "alpha.*-101"),
        ({"weight_decay": -1e-4}, "weight_decay.*-0.0001"),
        ({"eps": -1e-6}, "eps value: -1e-06"),
        ({"eps2": -1.0}, "eps2.*-1.0"),
        ({"eps3": float("nan")}, "eps3.*nan"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALTO([nn.Parameter(torch.zeros(2))], **kwargs)


def test_invalid_group_override_raises():
    optimizer = ALTO([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="alpha.*20.0"):
        optimizer.add_param_group(
            {"params": [nn.Parameter(torch.zeros(2))], "alpha": 20.0, "betas": (0.9, 0.9, 0.99)}
        )


def test_registry_and_small_batch_preset():
    model, _ = make_problem(steps=1)
    optimizer = create_optimizer("alto", model)
    assert isinstance(optimizer, ALTO)
    by_trust = {g["trust_ratio"]: g for g in optimizer.param_groups}
    assert by_trust[True]["weight_decay"] == 1e-4 and by_trust[False]["weight_decay"] == 0.0
    assert (by_trust[True]["alpha"], by_trust[True]["betas"]) == (-5.0, (0.99, 0.9, 0.99))
    small = ALTO(model.parameters(), **ALTO.SMALL_BATCH)
    assert (small.defaults["alpha"], small.defaults["betas"][0]) == (0.5, 0.01)
