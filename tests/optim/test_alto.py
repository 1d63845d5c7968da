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
from layerwise_problem import (
    flat_parameters,
    gradients,
    loss_of,
    make_problem,
    max_relative_error,
    train,
)
from state_compare import assert_same
from torch import nn

from largebatch.optim import create_optimizer
from largebatch.optim.alto import ALTO
from largebatch.optim.e_adaptor import E

STEPS = 50
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}
PATHS = {
    "single_tensor": {"foreach": False},
    "foreach": {"foreach": True},
    "compiled": {"compiled": True},
}


def split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matrices, and 1-D parameters (biases, norm weights)."""
    params = list(model.parameters())
    return [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]


def exempt_groups(model: nn.Module) -> list[dict]:
    """Matrices with the optimizer's defaults; 1-D parameters without decay or trust ratio."""
    matrices, vectors = split(model)
    return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0, "trust_ratio": False}]


def assert_trajectories_close(actual, expected, **tolerance) -> None:
    torch.testing.assert_close(
        torch.stack(actual), torch.stack(expected), **(tolerance or TOLERANCE)
    )


def paper_alto(model, batches, *, lr, alpha, betas, weight_decay, eps, eps2, eps3) -> list:
    """Alg. 2 in float64, one layer at a time; 1-D parameters: no decay, no trust ratio.

    ``betas`` in the paper's order ``(beta1, beta2, beta3)``: E's, then Adam's.
    """
    beta1, beta2, beta3 = betas
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    zeros = {n: torch.zeros_like(t) for n, t in theta.items()}
    diff_ema, previous, m, v = dict(zeros), dict(zeros), dict(zeros), dict(zeros)
    trajectory = []
    for k, batch in enumerate(batches, start=1):
        g = gradients(model, theta, batch)
        for n in theta:
            matrix = theta[n].ndim > 1
            diff_ema[n] = beta1 * diff_ema[n] + (1 - beta1) * (g[n] - previous[n])
            previous[n] = g[n]
            extrapolated = g[n] + alpha * diff_ema[n]
            m[n] = beta2 * m[n] + (1 - beta2) * extrapolated
            v[n] = beta3 * v[n] + (1 - beta3) * extrapolated**2
            m_hat, v_hat = m[n] / (1 - beta2**k), v[n] / (1 - beta3**k)
            r = m_hat / (v_hat.sqrt() + eps) + (weight_decay if matrix else 0.0) * theta[n]
            ratio = 1.0
            if matrix:
                phi = theta[n].norm() + eps3
                ratio = phi / (r.norm() + eps2 * phi)
            theta[n] = theta[n] - lr * ratio * r
        trajectory.append(flat_parameters(theta))
    return trajectory


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("alpha", "beta1"), [(-5.0, 0.99), (0.5, 0.01)])
def test_matches_paper_algorithm_2(path, alpha, beta1):
    """Every execution path, with the default eps2/eps3 trust ratio on matrices."""
    model, batches = make_problem(STEPS)
    hparams = dict(lr=1e-2, alpha=alpha, eps=1e-6, eps2=1e-6, eps3=1e-10)
    expected = paper_alto(model, batches, weight_decay=1e-2, betas=(beta1, 0.9, 0.99), **hparams)
    optimizer = ALTO(
        exempt_groups(model),
        weight_decay=1e-2,
        betas=(0.9, 0.99),
        e_beta1=beta1,
        **PATHS[path],
        **hparams,
    )
    assert_trajectories_close(train(model, optimizer, batches), expected)


def test_alpha_zero_is_bias_corrected_lamb_with_the_paper_ratio():
    """With alpha = 0 the E term vanishes: Adam moments of g, bias correction, phi ratio.

    Every tensor has the trust ratio, the zero-initialised LayerNorm bias included: its
    ratio is 1 while its norm is 0 (as LAMB's), so it moves.
    """
    model, batches = make_problem(STEPS)
    lr, (beta2, beta3), wd, eps, eps2, eps3 = 1e-2, (0.9, 0.99), 1e-2, 1e-6, 1e-3, 1e-3
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    expected = []
    for k, batch in enumerate(batches, start=1):
        g = gradients(model, theta, batch)
        for n in theta:
            m[n] = beta2 * m[n] + (1 - beta2) * g[n]
            v[n] = beta3 * v[n] + (1 - beta3) * g[n] ** 2
            r = (m[n] / (1 - beta2**k)) / ((v[n] / (1 - beta3**k)).sqrt() + eps) + wd * theta[n]
            phi = theta[n].norm() + eps3
            ratio = phi / (r.norm() + eps2 * phi) if theta[n].norm() > 0 else 1.0
            theta[n] = theta[n] - lr * ratio * r
        expected.append(flat_parameters(theta))
    optimizer = ALTO(
        model.parameters(),
        lr=lr,
        alpha=0.0,
        betas=(beta2, beta3),
        weight_decay=wd,
        eps=eps,
        eps2=eps2,
        eps3=eps3,
    )
    assert_trajectories_close(train(model, optimizer, batches), expected)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_follows_reference_package(dtype, rtol):
    """``e-optimizer-adaptor`` 0.1.0's ALTO, its conditions reproduced around our optimizer.

    The package clips the global gradient norm to 1 inside ``step`` (here: a step
    pre-hook), uses ``||w|| / ||r||`` (here: ``eps2 = eps3 = 0``) and applies no trust
    ratio where weight decay is 0 (here: ``trust_ratio=False`` on that group).
    """
    reference_alto = pytest.importorskip("ALTO").ALTO
    model, batches = make_problem(STEPS, dtype=dtype)
    reference_model = copy.deepcopy(model)
    hparams = dict(lr=1e-2, eps=1e-6, weight_decay=1e-2)
    matrices, vectors = split(reference_model)
    reference = reference_alto(
        [{"params": matrices}, {"params": vectors, "weight_decay": 0}],
        alp=-5.0,
        betas=(0.99, 0.9, 0.99),
        **hparams,
    )
    expected = train(reference_model, reference, batches)

    ours = ALTO(
        exempt_groups(model),
        alpha=-5.0,
        betas=(0.9, 0.99),
        e_beta1=0.99,
        eps2=0.0,
        eps3=0.0,
        **hparams,
    )

    def clip_like_the_package(*_) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)

    ours.register_step_pre_hook(clip_like_the_package)
    assert_trajectories_close(train(model, ours, batches), expected, rtol=rtol, atol=rtol * 1e-2)


def test_first_step_moves_every_coordinate_by_lr():
    """At k = 1 bias correction gives m_hat / sqrt(v_hat) = sign(ghat) = sign(g) (|c| < 1)."""
    param = nn.Parameter(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64))
    param.grad = torch.tensor([1e-3, -4.0, 0.25], dtype=torch.float64)
    optimizer = ALTO([param], lr=0.1, weight_decay=0.0, eps=0.0, trust_ratio=False)
    optimizer.step()
    expected = torch.tensor([0.4, -1.9, 2.9], dtype=torch.float64)
    torch.testing.assert_close(param.detach(), expected, **TOLERANCE)


def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    model, batches = make_problem(20)
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
    model, batches = make_problem(1)
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    optimizer = ALTO(model.parameters(), lr=1e-2)

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, batches[0])
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
        ({"e_beta1": 1.0}, "beta1.*1.0"),
        ({"betas": (-0.1, 0.99)}, "index 0: -0.1"),
        ({"betas": (0.9, 1.5)}, "index 1: 1.5"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (0.99, 0.9, 0.99)}, "e_beta1"),
        ({"alpha": -101.0}, "alpha.*-101"),
        ({"weight_decay": -1e-4}, "weight_decay.*-0.0001"),
        ({"eps": -1e-6}, "eps value: -1e-06"),
        ({"eps2": -1.0}, "eps2.*-1.0"),
        ({"eps3": float("nan")}, "eps3.*nan"),
        ({"foreach": False, "compiled": True}, "compiled"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALTO([nn.Parameter(torch.zeros(2))], **kwargs)


def test_invalid_group_override_raises():
    optimizer = ALTO([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="alpha.*20.0"):
        optimizer.add_param_group(
            {"params": [nn.Parameter(torch.zeros(2))], "alpha": 20.0, "e_beta1": 0.9}
        )


def test_registry_and_small_batch_preset():
    model, _ = make_problem(1)
    optimizer = create_optimizer("alto", model)
    assert isinstance(optimizer, ALTO)
    by_trust = {g["trust_ratio"]: g for g in optimizer.param_groups}
    assert by_trust[True]["weight_decay"] == 1e-4 and by_trust[False]["weight_decay"] == 0.0
    group = by_trust[True]
    assert (group["alpha"], group["e_beta1"], group["betas"]) == (-5.0, 0.99, (0.9, 0.99))
    small = ALTO(model.parameters(), **ALTO.SMALL_BATCH)
    assert (small.defaults["alpha"], small.defaults["e_beta1"]) == (0.5, 0.01)


# --- zero-initialised tensors (issue 13) ---------------------------------------------------


def _zero_initialised_problem(steps: int):
    """The MLP with every bias at zero (the LayerNorm's shift already is): 3 zero tensors."""
    model, batches = make_problem(steps)
    with torch.no_grad():
        model[0].bias.zero_()
        model[3].bias.zero_()
    assert sum(int(p.norm() == 0) for p in model.parameters()) == 3
    return model, batches


def test_zero_initialised_parameters_follow_the_reference_package():
    """Raw ``model.parameters()``, no group exemptions: every tensor has the trust ratio.

    The reference applies ``||w|| / ||r||`` (1 where a norm is 0) to every tensor when
    weight decay is non-zero; ours with ``eps2 = eps3 = 0`` is that ratio.
    """
    reference_alto = pytest.importorskip("ALTO").ALTO
    model, batches = _zero_initialised_problem(STEPS)
    reference_model = copy.deepcopy(model)
    hparams = dict(lr=1e-2, eps=1e-6, weight_decay=1e-2)
    reference = reference_alto(
        reference_model.parameters(), alp=-5.0, betas=(0.99, 0.9, 0.99), **hparams
    )
    expected = train(reference_model, reference, batches)

    ours = ALTO(model.parameters(), alpha=-5.0, e_beta1=0.99, eps2=0.0, eps3=0.0, **hparams)

    def clip_like_the_package(*_) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)

    ours.register_step_pre_hook(clip_like_the_package)
    assert_trajectories_close(train(model, ours, batches), expected)
    assert model[0].bias.norm() > 1e-3  # the zero biases moved


@pytest.mark.parametrize("path", PATHS)
def test_zero_parameter_moves_by_lr_with_the_default_guards(path):
    """Issue 13's case: ``p = 0``, gradients of ones; the first step is ``-lr * r``, ``r ~ 1``."""
    p = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    q = nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = create_optimizer("alto", [p, q], **PATHS[path])
    lr = optimizer.param_groups[0]["lr"]
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    optimizer.step()
    # Bias-corrected first step: r = ghat / (|ghat| + eps), ghat = (1 + c) g (mu_0 = 0).
    group = optimizer.param_groups[0]
    ghat = 1.0 + group["alpha"] * (1.0 - group["e_beta1"])
    expected = -lr * ghat / (ghat + group["eps"])
    torch.testing.assert_close(p.detach(), torch.full_like(p, expected), rtol=1e-12, atol=0)


# --- betas and LR schedulers (issue 13) ----------------------------------------------------


CYCLING = {
    "OneCycleLR": lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=STEPS
    ),
    "CyclicLR": lambda optimizer: torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=1e-3, max_lr=1e-2, step_size_up=5
    ),
}


@pytest.mark.parametrize("scheduler", CYCLING)
def test_cycling_schedulers_move_adams_first_moment_not_e(scheduler):
    """``cycle_momentum`` writes ``betas[0]``: ALTO's first-moment decay, as it is Adam's.

    ALTO without trust ratio or decay is E over Adam, so under the same schedule it must
    follow ``E(torch.optim.Adam)``, whose ``betas[0]`` the scheduler cycles too, while
    E's coefficient ``e_beta1`` stays put.
    """
    model, batches = make_problem(STEPS)
    reference_model = copy.deepcopy(model)
    settings = dict(alpha=-5.0, e_beta1=0.99)
    ours = ALTO(model.parameters(), weight_decay=0.0, eps=1e-8, trust_ratio=False, **settings)
    ours_schedule = CYCLING[scheduler](ours)
    reference = E(
        torch.optim.Adam(reference_model.parameters(), betas=(0.9, 0.99), eps=1e-8),
        alpha=-5.0,
        beta1=0.99,
    )
    reference_schedule = CYCLING[scheduler](reference)
    first_moments = set()
    trajectory, expected = [], []
    for batch in batches:
        first_moments.add(ours.param_groups[0]["betas"][0])
        trajectory += train(model, ours, [batch], ours_schedule)
        expected += train(reference_model, reference, [batch], reference_schedule)
        assert ours.param_groups[0]["e_beta1"] == 0.99
        assert ours.param_groups[0]["betas"] == reference.param_groups[0]["betas"]
    assert len(first_moments) > 4  # the scheduler did cycle betas[0]
    assert_trajectories_close(trajectory, expected)

    # Negative control: a reference whose first moment stays at 0.9 ends elsewhere.
    model, _ = make_problem(STEPS)
    fixed = E(
        torch.optim.Adam(model.parameters(), betas=(0.9, 0.99), eps=1e-8), alpha=-5.0, beta1=0.99
    )
    fixed_schedule = CYCLING[scheduler](fixed)
    fixed_schedule.use_beta1 = False  # cycle the learning rate only
    fixed_schedule.cycle_momentum = False
    unmoved = train(model, fixed, batches, fixed_schedule)
    assert max_relative_error(unmoved, expected) > 1e-4


def test_state_saved_with_paper_order_betas_loads():
    """A checkpoint from before ``e_beta1`` (``betas = (e_beta1, beta1, beta2)``) is converted."""
    model, batches = make_problem(4)
    optimizer = ALTO(model.parameters(), betas=(0.8, 0.95), e_beta1=0.9)
    train(model, optimizer, batches)
    state = optimizer.state_dict()
    old = copy.deepcopy(state)
    for group in old["param_groups"]:
        group["betas"] = (group.pop("e_beta1"), *group["betas"])
    resumed = ALTO(model.parameters())
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["betas"] == (0.8, 0.95)
    assert resumed.param_groups[0]["e_beta1"] == 0.9
    assert_same(resumed.state_dict(), state)
