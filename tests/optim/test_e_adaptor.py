"""The E adaptor against the paper's recursions, Popov's method and the reference package.

Expected trajectories are re-derived here in float64 from the paper's *two-buffer*
recursion ``a_k = beta1 a_{k-1} + (1 - beta1)(g_k - g_{k-1})``, ``ghat = g + alpha a``,
so agreement also proves the one-buffer form the implementation uses.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from layerwise_problem import flat_parameters, gradients, loss_of, make_problem, train
from torch import nn

from largebatch.optim import create_optimizer
from largebatch.optim.e_adaptor import E
from largebatch.optim.transforms import e_gradient_, e_gradients_

STEPS = 50
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_trajectories_close(actual, expected, **tolerance) -> None:
    torch.testing.assert_close(
        torch.stack(actual), torch.stack(expected), **(tolerance or TOLERANCE)
    )


def paper_esgd(model, batches, *, lr, momentum, alpha, beta1) -> list[torch.Tensor]:
    """ESGD (paper Alg. 3): heavy ball without dampening on ``g + alpha a``."""
    theta = parameters_of(model)
    diff_ema = {n: torch.zeros_like(t) for n, t in theta.items()}
    previous = {n: torch.zeros_like(t) for n, t in theta.items()}
    velocity = {n: torch.zeros_like(t) for n, t in theta.items()}
    trajectory = []
    for batch in batches:
        g = gradients(model, theta, batch)
        for n in theta:
            diff_ema[n] = beta1 * diff_ema[n] + (1 - beta1) * (g[n] - previous[n])
            previous[n] = g[n]
            velocity[n] = momentum * velocity[n] + (g[n] + alpha * diff_ema[n])
            theta[n] = theta[n] - lr * velocity[n]
        trajectory.append(flat_parameters(theta))
    return trajectory


def test_one_buffer_transform_equals_two_buffer_recursion():
    """Both paths of the shared transform (single tensor, ``_foreach``) against the recursion."""
    generator = torch.Generator().manual_seed(1)
    alpha, beta1 = -5.0, 0.9
    grads = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(30)]
    diff_ema, previous = (
        torch.zeros(3, 4, dtype=torch.float64),
        torch.zeros(3, 4, dtype=torch.float64),
    )
    single_ema, multi_ema = torch.zeros_like(diff_ema), torch.zeros_like(diff_ema)
    for g in grads:
        diff_ema = beta1 * diff_ema + (1 - beta1) * (g - previous)
        previous = g
        expected = g + alpha * diff_ema
        torch.testing.assert_close(e_gradient_(g, single_ema, alpha, beta1), expected, **TOLERANCE)
        (multi,) = e_gradients_([g], [multi_ema], alpha, beta1)
        torch.testing.assert_close(multi, expected, **TOLERANCE)


@pytest.mark.parametrize(("alpha", "beta1"), [(-5.0, 0.99), (0.5, 0.01), (-0.8, 0.5)])
def test_e_over_sgd_momentum_is_paper_esgd(alpha, beta1):
    model, batches = make_problem(STEPS)
    expected = paper_esgd(model, batches, lr=0.05, momentum=0.9, alpha=alpha, beta1=beta1)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.0)
    actual = train(model, E(base, alpha=alpha, beta1=beta1), batches)
    assert_trajectories_close(actual, expected)


def test_alpha_one_beta_zero_is_popov_extrapolation_from_the_past():
    """Popov: w~_t = w_t - lr g(w~_{t-1}), w_{t+1} = w_t - lr g(w~_t); E-SGD's iterates are w~."""
    model, (batch,) = make_problem(1)
    lr = 0.1
    w = parameters_of(model)
    previous_gradient = {n: torch.zeros_like(t) for n, t in w.items()}
    extrapolated_points = []
    for _ in range(STEPS + 1):
        w_tilde = {n: w[n] - lr * previous_gradient[n] for n in w}
        extrapolated_points.append(flat_parameters(w_tilde))
        g = gradients(model, w_tilde, batch)
        w = {n: w[n] - lr * g[n] for n in w}
        previous_gradient = g
    optimizer = E(torch.optim.SGD(model.parameters(), lr=lr), alpha=1.0, beta1=0.0)
    actual = train(model, optimizer, [batch] * STEPS)
    assert_trajectories_close(actual, extrapolated_points[1:])


def test_matches_reference_package_e():
    """``e-optimizer-adaptor`` 0.1.0's ``E`` feeds SGD the same gradients (it keeps two buffers)."""
    reference_e = pytest.importorskip("E").E
    model, batches = make_problem(STEPS)
    reference_model = copy.deepcopy(model)
    reference = reference_e(
        torch.optim.SGD(reference_model.parameters(), lr=0.05, momentum=0.9), alpha=-5, beta=0.9
    )
    expected = train(reference_model, reference, batches)
    ours = E(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), alpha=-5.0, beta1=0.9)
    assert_trajectories_close(train(model, ours, batches), expected)


def test_alpha_zero_groups_follow_the_base_optimizer():
    """Per-group ``e_alpha`` overrides the adaptor's default; alpha=0 leaves the base unchanged."""
    model, batches = make_problem(STEPS)
    plain_model, default_model = copy.deepcopy(model), copy.deepcopy(model)
    groups = [{"params": model[0].parameters(), "e_alpha": 0.0}]
    groups.append({"params": [*model[1].parameters(), *model[3].parameters()], "e_alpha": 0.0})
    optimizer = E(torch.optim.AdamW(groups, lr=1e-2), alpha=-5.0, beta1=0.9)
    assert [g["e_alpha"] for g in optimizer.param_groups] == [0.0, 0.0]
    plain = train(plain_model, torch.optim.AdamW(plain_model.parameters(), lr=1e-2), batches)
    assert_trajectories_close(train(model, optimizer, batches), plain)
    default = E(torch.optim.AdamW(default_model.parameters(), lr=1e-2), alpha=-5.0, beta1=0.9)
    assert not torch.allclose(train(default_model, default, batches)[-1], plain[-1], rtol=1e-4)


def test_grad_is_the_callers_gradient_after_step():
    model, batches = make_problem(3)
    optimizer = E(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=0.5, beta1=0.1)
    for batch in batches:
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, before[name]), name


def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    model, batches = make_problem(20)
    resumed_model = copy.deepcopy(model)

    def build(m):
        return E(torch.optim.AdamW(m.parameters(), lr=1e-2), alpha=-5.0, beta1=0.9)

    uninterrupted = train(model, build(model), batches)
    first = build(resumed_model)
    train(resumed_model, first, batches[:10])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build(resumed_model)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.param_groups[0] is resumed.base_optimizer.param_groups[0]
    weight = resumed_model[0].weight
    torch.testing.assert_close(resumed.state[weight]["grad_ema"], first.state[weight]["grad_ema"])
    continued = train(resumed_model, resumed, batches[10:])
    assert_trajectories_close(continued, uninterrupted[10:], rtol=0.0, atol=0.0)


def test_lr_scheduler_and_added_group_reach_the_base():
    model, _ = make_problem(1)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = E(base)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.add_param_group({"params": [extra], "lr": 1.0, "e_alpha": 0.5, "e_beta1": 0.0})
    assert base.param_groups[-1] is optimizer.param_groups[-1]
    extra.grad = torch.ones(3, dtype=torch.float64)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    # ghat = (1 + c) g with c = 0.5 on the first step (mu_0 = 0): 1.5 * lr * g.
    torch.testing.assert_close(extra.detach(), torch.full((3,), -1.5, dtype=torch.float64))


def test_step_with_closure_returns_its_loss_and_skips_params_without_grad():
    model, (batch,) = make_problem(1)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    optimizer = E(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    optimizer.add_param_group({"params": [frozen]})

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert torch.equal(frozen, before) and frozen not in optimizer.state
    assert model[3].weight in optimizer.state


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -100.5, "beta1": 0.99}, "-100.5"),
        ({"alpha": 1.01, "beta1": 0.0}, "alpha.*1.01"),
        ({"alpha": float("nan")}, "nan"),
        ({"beta1": 1.0}, "beta1.*1.0"),
        ({"beta1": -0.1}, "beta1.*-0.1"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
    model, _ = make_problem(1)
    with pytest.raises(ValueError, match=match):
        E(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_invalid_group_override_and_base_raise():
    model, _ = make_problem(1)
    optimizer = E(torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="alpha.*-300"):
        optimizer.add_param_group({"params": model[3].parameters(), "e_alpha": -300.0})
    assert len(optimizer.base_optimizer.param_groups) == 1
    with pytest.raises(TypeError, match="list"):
        E([torch.zeros(1)])


def test_deepcopy_keeps_the_base_optimizer_and_shared_groups():
    model, batches = make_problem(2)
    optimizer = E(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    train(model, optimizer, batches)
    clone = copy.deepcopy(optimizer)
    assert clone.param_groups[0] is clone.base_optimizer.param_groups[0]
    assert set(clone.state_dict()["base_optimizer"]["state"][0]) == {"momentum_buffer"}


def test_registry_builds_e_over_adamw():
    model, _ = make_problem(1)
    optimizer = create_optimizer("e", model, lr=3e-3)
    assert isinstance(optimizer, E) and isinstance(optimizer.base_optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 3e-3
    assert (optimizer.param_groups[0]["e_alpha"], optimizer.param_groups[0]["e_beta1"]) == (
        -5.0,
        0.99,
    )
