"""Newton-CG against SciPy's Newton-CG and the theory of inexact Newton methods.

* Full-batch L2-regularised logistic regression: ours and
  ``scipy.optimize.minimize(method="Newton-CG")`` (fed a Hessian-vector product
  re-derived by hand in float64, not autograd) reach the same optimum to 1e-8.
* A forcing sequence ``rho_k = min(rho, sqrt(||g_k||))`` converges superlinearly
  (gradient-norm ratios go to 0); a fixed ``rho`` does not (negative control).
* On a quadratic, one step with exact CG is the Newton step and lands on the
  minimizer (T-16).
* Subsampled: gradient and Hessian on samples, it still descends to near the optimum.
* Bad input raises ``ValueError`` naming the value; a loss without second
  derivatives is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from classical_problems import LogReg, flat_weights
from torch import nn

from largebatch.optim.newton_cg import NewtonCG

WD = 1e-2
SCALE = 1e4


@pytest.fixture(scope="module")
def problem() -> LogReg:
    return LogReg(num_train=200, num_features=20, weight_decay=WD)


def hessian_vector_product(problem: LogReg, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The regularised softmax cross-entropy Hessian times ``v``, by hand (review Example 6.2)."""
    X, d = problem.X.numpy(), problem.d
    weight, bias = w[: 2 * d].reshape(2, d), w[2 * d :]
    dweight, dbias = v[: 2 * d].reshape(2, d), v[2 * d :]
    logits = X @ weight.T + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dlogits = X @ dweight.T + dbias
    # (diag(p) - p p^T) dz for every example
    hz = p * dlogits - p * (p * dlogits).sum(axis=1, keepdims=True)
    n = len(X)
    product = np.concatenate([(hz.T @ X / n).reshape(-1), hz.mean(axis=0)])
    return product + WD * v


def full_batch_closure(problem: LogReg, model: nn.Module):
    return lambda: problem.data_loss(model)


def scipy_newton_cg(problem: LogReg) -> np.ndarray:
    """SciPy's Newton-CG on ``SCALE * F`` (same minimizer).

    SciPy's CG stops when ``p^T H p <= 3 eps`` in absolute terms, which for ``F``
    itself happens at gradients near 1e-8; scaling ``F`` moves that limit to
    machine precision.
    """

    def scaled(w: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient = problem._function(w)
        return SCALE * value, SCALE * gradient

    return scipy.optimize.minimize(
        scaled,
        np.zeros(2 * problem.d + 2),
        jac=True,
        hessp=lambda w, v: SCALE * hessian_vector_product(problem, w, v),
        method="Newton-CG",
        options={"xtol": 1e-14, "maxiter": 200},
    ).x


def newton_cg_from_zero(problem: LogReg, steps: int) -> np.ndarray:
    """Full-batch Newton-CG from ``w = 0``: the weights after ``steps`` steps."""
    model = problem.model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    optimizer = NewtonCG(model.parameters(), weight_decay=WD, cg_tol=1e-3, max_cg=100)
    for _ in range(steps):
        optimizer.step(full_batch_closure(problem, model))
    return flat_weights(model).numpy()


def test_matches_scipy_newton_cg_to_1e_8(problem):
    reference = scipy_newton_cg(problem)
    scale = np.linalg.norm(reference)
    ours = newton_cg_from_zero(problem, 12)
    assert np.linalg.norm(ours - reference) / scale < 1e-8
    # the optimum an unrelated method finds (L-BFGS-B stops on F's relative
    # reduction near machine precision, so its w* is good to about sqrt(eps))
    assert np.linalg.norm(ours - problem.solution[0]) / scale < 1e-7
    # negative control: stopped after two steps, the comparison fails
    assert np.linalg.norm(newton_cg_from_zero(problem, 2) - reference) / scale > 1e-8


def gradient_norms(problem: LogReg, forcing: str, steps: int) -> list[float]:
    model = problem.model()
    optimizer = NewtonCG(
        model.parameters(), weight_decay=WD, cg_tol=0.5, max_cg=100, forcing=forcing
    )
    norms = []
    for _ in range(steps):
        optimizer.step(full_batch_closure(problem, model))
        norms.append(optimizer.step_statistics()["gradient_norm"])
    return norms


def test_superlinear_forcing_converges_superlinearly_and_fixed_tolerance_linearly(problem):
    fast = gradient_norms(problem, "superlinear", 6)  # 1e-1 to 1e-8: float64 rounding stays out
    ratios = [b / a for a, b in zip(fast, fast[1:])]
    assert all(b < a for a, b in zip(ratios, ratios[1:])), ratios  # the ratios shrink ...
    assert ratios[-1] < 1e-3, ratios  # ... towards 0
    slow = gradient_norms(problem, "fixed", 8)
    slow_ratios = [b / a for a, b in zip(slow, slow[1:])]
    assert min(slow_ratios[2:]) > 1e-2, slow_ratios  # linear: bounded away from 0


def test_one_exact_newton_step_solves_a_quadratic():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    optimizer = NewtonCG(model.parameters(), cg_tol=1e-12, max_cg=7)
    optimizer.step(lambda: 0.5 * F.mse_loss(model(X), y))
    design = torch.cat([X, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution.reshape(-1)
    torch.testing.assert_close(
        torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]),
        solution,
        rtol=1e-10,
        atol=1e-10,
    )
    statistics = optimizer.step_statistics()
    assert statistics["step_size"] == 1.0 and statistics["cg_iterations"] <= 7


def subsampled_run(problem: LogReg, gradient_sample: int, steps: int = 25) -> list[float]:
    """Suboptimality after each step with a fresh Hessian sample of 16 examples per step."""
    model = problem.model()
    optimizer = NewtonCG(model.parameters(), weight_decay=WD, cg_tol=0.1, max_cg=10)
    generator = torch.Generator().manual_seed(0)
    gaps = []
    for _ in range(steps):
        batch = torch.randperm(problem.n, generator=generator)
        optimizer.step(
            lambda batch=batch: problem.data_loss(model, batch[:gradient_sample]),
            lambda batch=batch: problem.data_loss(model, batch[:16]),
        )
        gaps.append(problem.suboptimality(model))
    return gaps


def test_subsampled_hessian_converges_linearly_and_a_sampled_gradient_stalls(problem):
    """Full gradient, Hessian on 16 examples: linear convergence (the review's Sec. 6.1 result).

    Negative control: a 64-example gradient sample leaves a noise floor.
    """
    exact = subsampled_run(problem, problem.n)
    assert exact[-1] < 1e-12
    slope = np.polyfit(np.arange(len(exact[:8])), np.log(exact[:8]), 1)[0]
    assert slope < np.log(0.3)  # at least a 0.3 contraction per step
    sampled = subsampled_run(problem, 64)
    assert min(sampled[-5:]) > 1e-4


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lr", -0.5),
        ("cg_tol", 0.0),
        ("cg_tol", 1.0),
        ("max_cg", 0),
        ("forcing", "quadratic"),
        ("damping", -1.0),
        ("weight_decay", -1e-3),
        ("backtrack_factor", 1.0),
        ("armijo", 0.0),
    ],
)
def test_bad_hyperparameters_raise_naming_the_value(option, value):
    with pytest.raises(ValueError, match=f"{option}.*{value}|{value}.*{option}|Invalid learning"):
        NewtonCG(nn.Linear(2, 1).parameters(), **{option: value})


def test_groups_must_share_the_solver_settings():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with pytest.raises(ValueError, match="Invalid cg_tol value: 0.2"):
        NewtonCG(
            [{"params": model[0].parameters()}, {"params": model[1].parameters(), "cg_tol": 0.2}]
        )
    NewtonCG(  # per-group lr and weight decay are fine
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}]
    )


def test_loss_without_second_derivatives_is_refused():
    x = torch.randn(8, 3)
    model = nn.Linear(3, 1)
    optimizer = NewtonCG(model.parameters())
    with pytest.raises(ValueError, match="no second derivatives"):
        optimizer.step(lambda: model(x).sum())  # linear in the parameters
    with pytest.raises(ValueError, match="no autograd graph"):
        optimizer.step(lambda: model(x).pow(2).mean().detach())

    class Once(torch.autograd.Function):  # a loss whose backward cannot be differentiated
        @staticmethod
        def forward(ctx, value):
            ctx.save_for_backward(value)
            return value.pow(2)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (value,) = ctx.saved_tensors
            return 2 * value * grad

    with pytest.raises(ValueError, match="differentiated twice|no second derivatives"):
        optimizer.step(lambda: Once.apply(model(x)).mean())
    optimizer.step(lambda: model(x).pow(2).mean())  # control: a smooth loss steps
