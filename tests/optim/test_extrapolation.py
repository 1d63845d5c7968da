"""The extrapolation wrapper (EXTRAP-SGD family and SAM) against its equations.

No public reference code exists (``shared/research/alto-extrap.md``, part 2), so the
expected trajectories are re-derived here in float64 numpy from the update rules:
``w~ = w_t + u_t``, ``g~ = g(w~)``, ``w_{t+1} = NesterovSGD(w_t, g~)``. Mini-batches are
reproducible draws from a seeded generator that the test and the training driver share.
"""

from __future__ import annotations

import copy
import io
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from largebatch.optim import create_optimizer, step_protocol_of
from largebatch.optim.extrapolation import Extrapolation

GRADIENTS_PER_STEP = {"extragradient": 2, "sam": 2, "past": 1, "noise": 1}


# --- a stochastic quadratic with reproducible mini-batches ---------------------------


class StochasticQuadratic:
    """``f(w; xi) = 1/2 w'Hw - b'w + sigma xi'w``; a mini-batch is one seeded draw of ``xi``.

    ``w`` is the concatenation of the parameters handed to :meth:`loss`.
    """

    def __init__(self, dim: int = 5, sigma: float = 0.3, seed: int = 0) -> None:
        rng = np.random.default_rng(1234)
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.h = q @ np.diag(np.linspace(0.5, 4.0, dim)) @ q.T
        self.b = rng.standard_normal(dim)
        self.sigma = sigma
        self.batches = np.random.default_rng(seed)

    def batch(self) -> np.ndarray:
        return self.batches.standard_normal(self.b.shape[0])

    def gradient(self, w: np.ndarray, xi: np.ndarray) -> np.ndarray:
        """Reference gradient, written out by hand."""
        return self.h @ w - self.b + self.sigma * xi

    def loss(self, params: list[torch.Tensor], xi: np.ndarray) -> torch.Tensor:
        w = torch.cat([p.reshape(-1) for p in params])
        h, b, xi = (torch.as_tensor(a, dtype=w.dtype) for a in (self.h, self.b, xi))
        return 0.5 * w @ h @ w - b @ w + self.sigma * xi @ w


def drive(optimizer, params, problem, steps, scheduler=None, on_closure=None):
    """Train as a loop does, following ``optimizer.step_protocol``.

    Returns the iterates after each step (one flat numpy vector each) and the number of
    forward/backward passes (pre-step gradient + closure calls). ``on_closure`` sees the
    parameters each time the closure runs, i.e. at the extrapolated point.
    """
    protocol = step_protocol_of(optimizer)
    passes = 0
    iterates = []

    def forward_backward(xi):
        nonlocal passes
        passes += 1
        loss = problem.loss(params, xi)
        loss.backward()
        return loss

    for _ in range(steps):
        xi = problem.batch()
        if protocol.gradient_before_step:
            optimizer.zero_grad()
            forward_backward(xi)

        def closure(xi=xi):
            if on_closure is not None:
                on_closure(flat(params))
            optimizer.zero_grad()
            return forward_backward(xi if protocol.closure == "same" else problem.batch())

        optimizer.step(closure)
        if scheduler is not None:
            scheduler.step()
        iterates.append(flat(params))
    return iterates, passes


def flat(params) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()


# Two parameter groups with different learning rates, decay and extrapolation settings.
SIZES = (3, 2)
GROUP_SETTINGS = (
    {
        "lr": 0.05,
        "weight_decay": 1e-2,
        "extrap_ratio": 1.0,
        "extrap_noise_std": 0.1,
        "extrap_rho": 0.05,
    },
    {
        "lr": 0.08,
        "weight_decay": 0.0,
        "extrap_ratio": 0.5,
        "extrap_noise_std": 0.02,
        "extrap_rho": 0.2,
    },
)
MOMENTUM = 0.9


def schedule(step: int) -> float:
    return 1.0 / (1.0 + 0.02 * step)


def make_params(seed=7):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, generator=generator, dtype=torch.float64).requires_grad_() for n in SIZES
    ]


def make_optimizer(params, variant, *, maximize=False, **kwargs):
    """Extrapolation over Nesterov SGD, group settings from ``GROUP_SETTINGS``."""
    keys = {
        "extragradient": ("extrap_ratio",),
        "past": ("extrap_ratio",),
        "noise": ("extrap_noise_std",),
        "sam": ("extrap_rho",),
    }[variant]
    groups = [
        {
            "params": [p],
            "lr": s["lr"],
            "weight_decay": s["weight_decay"],
            "trust_ratio": i == 0,  # only read by the layer-wise extrapolation
            **{k: s[k] for k in keys},
        }
        for i, (p, s) in enumerate(zip(params, GROUP_SETTINGS))
    ]
    base = torch.optim.SGD(groups, lr=0.1, momentum=MOMENTUM, nesterov=True, maximize=maximize)
    return Extrapolation(base, variant=variant, **kwargs)


def per_coordinate(key: str) -> np.ndarray:
    return np.concatenate([np.full(n, s[key]) for n, s in zip(SIZES, GROUP_SETTINGS)])


def layerwise_scaled(w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``d`` with its first tensor scaled by ``||w|| / ||d||`` (1 if a norm is 0).

    The second tensor's group has ``trust_ratio=False`` and keeps the raw direction.
    """
    n = SIZES[0]
    w_norm, d_norm = np.linalg.norm(w[:n]), np.linalg.norm(d[:n])
    scale = w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
    return np.concatenate([scale * d[:n], d[n:]])


def reference_trajectory(
    variant, problem, w, steps, *, layerwise=False, adaptive=False, eta=0.01, noise_seed=0
):
    """Float64 re-derivation of the variant's equations over torch-semantics Nesterov SGD."""
    lr0, decay = per_coordinate("lr"), per_coordinate("weight_decay")
    ratio, rho, std = (
        per_coordinate(k) for k in ("extrap_ratio", "extrap_rho", "extrap_noise_std")
    )
    noise = torch.Generator().manual_seed(noise_seed)
    previous_gradient = np.zeros_like(w)
    momentum = None
    iterates = []
    for t in range(steps):
        lr = lr0 * schedule(t)
        xi = problem.batch()
        xi_tilde = xi
        if variant in ("extragradient", "past"):
            if variant == "extragradient":
                direction = problem.gradient(w, xi)
                xi_tilde = problem.batch()
            else:
                direction = previous_gradient
            if layerwise:
                direction = layerwise_scaled(w, direction)
            u = -lr * ratio * direction
        elif variant == "noise":
            draws = [torch.randn(n, generator=noise, dtype=torch.float64) for n in SIZES]
            u = std * torch.cat(draws).numpy()
        else:  # sam
            g = problem.gradient(w, xi)
            scale = np.abs(w) + eta if adaptive else np.ones_like(w)
            u = rho * scale**2 * g / np.linalg.norm(scale * g)
        g_tilde = problem.gradient(w + u, xi_tilde)
        previous_gradient = g_tilde
        d = g_tilde + decay * w
        momentum = d if momentum is None else MOMENTUM * momentum + d
        w = w - lr * (d + MOMENTUM * momentum)
        iterates.append(w)
    return iterates


# --- the classical oracle: the bilinear saddle min_x max_y x*y ------------------------


def run_bilinear(variant, lr, steps):
    """Radii ``||(x, y)||`` after each step of descent on x / ascent on y."""
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    base = torch.optim.SGD([x, y], lr=lr)
    optimizer = base if variant is None else Extrapolation(base, variant=variant)

    def game_gradient():
        optimizer.zero_grad()
        loss = x * y
        loss.backward()
        y.grad.neg_()  # y maximises
        return loss

    radii = []
    for _ in range(steps):
        if variant is None:
            game_gradient()
            optimizer.step()
        else:
            if step_protocol_of(optimizer).gradient_before_step:
                game_gradient()
            optimizer.step(game_gradient)
        radii.append(math.hypot(x.item(), y.item()))
    return np.array(radii)


def test_bilinear_saddle_extragradient_converges_gradient_descent_ascent_spirals_out():
    lr, steps, r0 = 0.3, 200, math.hypot(1.0, 0.5)
    n = np.arange(1, steps + 1)
    extragradient = run_bilinear("extragradient", lr, steps)
    simultaneous = run_bilinear(None, lr, steps)
    # z' = ((1 - lr^2) I - lr J) z and z' = (I - lr J) z with J a rotation: exact moduli.
    np.testing.assert_allclose(extragradient, r0 * (1 - lr**2 + lr**4) ** (n / 2), rtol=1e-9)
    np.testing.assert_allclose(simultaneous, r0 * (1 + lr**2) ** (n / 2), rtol=1e-9)
    assert extragradient[-1] < 1e-3 * r0 and np.all(np.diff(extragradient) < 0)
    assert simultaneous[-1] > 100 * r0 and np.all(np.diff(simultaneous) > 0)
    # Extrapolation from the past (optimistic gradient) also converges on this game.
    assert run_bilinear("past", lr, steps)[-1] < 1e-2 * r0


# --- each variant equals its float64 equations for 100 steps ---------------------------


@pytest.mark.parametrize(
    ("variant", "options"),
    [
        ("extragradient", {}),
        ("extragradient", {"layerwise": True}),
        ("past", {}),
        ("past", {"layerwise": True}),
        ("noise", {"noise_seed": 3}),
        ("sam", {}),
        ("sam", {"adaptive": True, "adaptive_eta": 0.05}),
    ],
)
def test_iterates_equal_float64_equations(variant, options):
    assert_follows_the_equations(variant, options, steps=100)


def assert_follows_the_equations(variant, options, *, steps, maximize=False):
    """The wrapper's iterates against :func:`reference_trajectory` (minimizing ``f``).

    With ``maximize`` the base maximizes ``-f`` (:class:`NegatedQuadratic`) instead.
    """
    params = make_params()
    w0 = flat(params)
    optimizer = make_optimizer(params, variant, maximize=maximize, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    problem = NegatedQuadratic() if maximize else StochasticQuadratic()
    iterates, _ = drive(optimizer, params, problem, steps, scheduler)
    expected = reference_trajectory(
        variant,
        StochasticQuadratic(),
        w0,
        steps,
        layerwise=options.get("layerwise", False),
        adaptive=options.get("adaptive", False),
        eta=options.get("adaptive_eta", 0.01),
        noise_seed=options.get("noise_seed", 0),
    )
    np.testing.assert_allclose(np.array(iterates), np.array(expected), rtol=1e-10, atol=1e-12)
    # The trajectory moved (so the comparison is not vacuous) and stayed finite.
    assert np.linalg.norm(iterates[-1] - w0) > 0.1


class NegatedQuadratic(StochasticQuadratic):
    """``-f`` for the quadratic ``f`` above: same mini-batches, negated loss and gradient."""

    def gradient(self, w: np.ndarray, xi: np.ndarray) -> np.ndarray:
        return -super().gradient(w, xi)

    def loss(self, params: list[torch.Tensor], xi: np.ndarray) -> torch.Tensor:
        return -super().loss(params, xi)


@pytest.mark.parametrize(
    ("variant", "options"),
    [
        ("extragradient", {}),
        ("extragradient", {"layerwise": True}),
        ("past", {}),
        ("sam", {}),
        ("sam", {"adaptive": True, "adaptive_eta": 0.05}),
    ],
)
def test_maximize_follows_the_equations_of_the_negated_loss(variant, options):
    """A base with ``maximize=True`` on ``-f`` extrapolates and perturbs as minimizing ``f``.

    The float64 re-derivation minimizes ``f``; the optimizer maximizes ``-f``. Were the
    sign of ``u`` ignored, the extragradient would extrapolate away from the step and SAM
    would perturb down the loss instead of up.
    """
    assert_follows_the_equations(variant, options, steps=60, maximize=True)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_past_over_sgd_equals_e_adaptor(ratio):
    """``past`` (Popov) over plain SGD: its extrapolated points are E-SGD's iterates.

    With ``w~_t = w_t - lr*r*g~_{t-1}`` the points obey
    ``w~_{t+1} = w~_t - lr*((1 + r) g~_t - r g~_{t-1})``, which is E with ``alpha = r``,
    ``beta1 = 0`` (the brief's case is r = 1).
    """
    from largebatch.optim.e_adaptor import E

    steps, lr = 100, 0.05
    params = make_params()
    past = Extrapolation(torch.optim.SGD(params, lr=lr), variant="past", ratio=ratio)
    extrapolated_points = []
    drive(past, params, StochasticQuadratic(), steps, on_closure=extrapolated_points.append)

    e_params = make_params()
    e_sgd = E(torch.optim.SGD(e_params, lr=lr), alpha=ratio, beta1=0.0)
    problem = StochasticQuadratic()
    e_iterates = []
    for _ in range(steps):
        e_iterates.append(flat(e_params))
        e_sgd.zero_grad()
        problem.loss(e_params, problem.batch()).backward()
        e_sgd.step()
    np.testing.assert_allclose(
        np.array(extrapolated_points), np.array(e_iterates), rtol=1e-10, atol=1e-12
    )


# --- cost, protocol and errors ---------------------------------------------------------


@pytest.mark.parametrize("variant", list(GRADIENTS_PER_STEP))
def test_forward_backward_passes_per_step(variant):
    """Counted on the model itself (forward and backward hooks), not by the optimizer."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    forwards, backwards = [], []
    model.register_forward_hook(lambda *_: forwards.append(1))
    model.weight.register_hook(lambda _: backwards.append(1))
    optimizer = create_optimizer("extrap-sgd", model, lr=0.05, variant=variant)
    protocol = step_protocol_of(optimizer)
    assert protocol.local_first_gradient == protocol.gradient_before_step
    inputs, targets = torch.randn(32, 4), torch.randn(32, 1)

    def forward_backward():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    steps = 5
    for _ in range(steps):
        if protocol.gradient_before_step:
            forward_backward()
        optimizer.step(forward_backward)
    expected = GRADIENTS_PER_STEP[variant] * steps
    assert len(forwards) == len(backwards) == expected
    assert optimizer.gradient_evaluations == expected


@pytest.mark.parametrize("variant", list(GRADIENTS_PER_STEP))
def test_step_without_closure_is_an_error(variant):
    params = make_params()
    optimizer = make_optimizer(params, variant)
    StochasticQuadratic().loss(params, np.zeros(5)).backward()
    with pytest.raises(ValueError, match=re.escape(f"(variant {variant!r}) needs step(closure)")):
        optimizer.step()


def test_extragradient_without_gradient_at_current_point_is_an_error():
    params = make_params()
    optimizer = make_optimizer(params, "extragradient")
    with pytest.raises(RuntimeError, match="call loss.backward\\(\\) before step"):
        optimizer.step(lambda: None)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"variant": "extrapolate"}, "'extrapolate'"),
        ({"ratio": -1.0}, "-1.0"),
        ({"ratio": float("nan")}, "nan"),
        ({"variant": "noise", "noise_std": -0.1}, "-0.1"),
        ({"variant": "noise", "noise_seed": 1.5}, "1.5"),
        ({"variant": "sam", "rho": -0.05}, "-0.05"),
        ({"variant": "sam", "rho": float("inf")}, "inf"),
        ({"variant": "sam", "adaptive_eta": -0.01}, "-0.01"),
        ({"variant": "sam", "adaptive": "yes"}, "'yes'"),
        ({"layerwise": 1}, "layerwise: 1"),
        ({"variant": "noise", "layerwise": True}, "layerwise=True"),
        ({"variant": "extragradient", "rho": 0.1}, "rho=0.1"),
        ({"variant": "sam", "ratio": 2.0}, "ratio=2.0"),
        ({"variant": "past", "noise_seed": 0}, "noise_seed: 0"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_value(kwargs, named):
    base = torch.optim.SGD(make_params(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape(named)):
        Extrapolation(base, **kwargs)


def test_bad_group_hyperparameter_and_bad_base_are_rejected():
    with pytest.raises(ValueError, match="-2"):
        make_optimizer(make_params(), "extragradient").add_param_group(
            {"params": [torch.zeros(2, requires_grad=True)], "extrap_ratio": -2}
        )
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Extrapolation(make_params())


# --- checkpointing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "options"),
    [
        ("extragradient", {}),
        ("past", {}),
        ("noise", {"noise_seed": 11}),
        ("sam", {"adaptive": True}),
    ],
)
def test_state_dict_round_trip_continues_exactly(variant, options):
    steps = 6
    params = make_params()
    optimizer = make_optimizer(params, variant, **options)
    problem = StochasticQuadratic()
    drive(optimizer, params, problem, steps)

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    saved_params = [p.detach().clone() for p in params]
    saved_problem = copy.deepcopy(problem)
    drive(optimizer, params, problem, steps)  # noise: also advances the generator

    resumed_params = [p.requires_grad_() for p in saved_params]
    resumed = make_optimizer(resumed_params, variant, **options)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.gradient_evaluations == GRADIENTS_PER_STEP[variant] * steps
    drive(resumed, resumed_params, saved_problem, steps)

    for uninterrupted, continued in zip(params, resumed_params):
        assert torch.equal(uninterrupted, continued)
    assert resumed.gradient_evaluations == optimizer.gradient_evaluations
    assert resumed.param_groups[0] is resumed.base_optimizer.param_groups[0]
    if variant == "past":
        assert torch.equal(
            resumed.state[resumed_params[0]]["previous_grad"],
            optimizer.state[params[0]]["previous_grad"],
        )


def test_loading_another_variants_state_is_an_error():
    params = make_params()
    saved = make_optimizer(params, "past").state_dict()
    with pytest.raises(ValueError, match="'past'.*'extragradient'"):
        make_optimizer(params, "extragradient").load_state_dict(saved)


# --- through the registry, over SGD, LARS and LAMB ----------------------------------------


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("extrap-sgd", {"lr": 0.05}),
        ("extrap-sgd", {"lr": 0.05, "variant": "past"}),
        ("extrap-sgd", {"lr": 0.05, "variant": "noise", "noise_std": 1e-3}),
        ("sam", {"lr": 0.05, "adaptive": True}),
        ("extrap-lars", {}),  # registry defaults: lr 1, layer-wise extrapolation
        ("extrap-lamb", {}),
    ],
)
def test_registered_optimizers_decrease_the_loss(name, hparams):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model.unused = nn.Parameter(torch.ones(3))  # never gets a gradient: must stay untouched
    teacher = nn.Linear(8, 1)
    inputs = torch.randn(256, 8)
    targets = teacher(inputs).detach()
    optimizer = create_optimizer(name, model, **hparams)
    assert isinstance(optimizer, Extrapolation)
    protocol = step_protocol_of(optimizer)
    batches = torch.randperm(256).split(64)

    def loss_on(batch):
        return nn.functional.mse_loss(model(inputs[batch]), targets[batch])

    initial = nn.functional.mse_loss(model(inputs), targets).item()
    for step in range(40):
        batch = batches[step % len(batches)]
        if protocol.gradient_before_step:
            optimizer.zero_grad()
            loss_on(batch).backward()

        def closure(batch=batch, step=step):
            optimizer.zero_grad()
            if protocol.closure == "fresh":
                batch = batches[(step + 1) % len(batches)]
            loss = loss_on(batch)
            loss.backward()
            return loss

        optimizer.step(closure)
    final = nn.functional.mse_loss(model(inputs), targets).item()
    assert final < 0.5 * initial
    assert torch.equal(model.unused, torch.ones(3))
