"""LAMB against pytorch-optimizer's Lamb, a float64 re-derivation of the paper, and torch's Adam.

pytorch-optimizer 4.1 ``Lamb`` follows the paper's v3 (no bias correction of the
moments) and differs from our default in five switches, each set so the definitions
coincide:

* bias correction: off there, so ``bias_correction=False`` here;
* its step size is ``lr / (1 - beta1^t)`` unless the group sets ``adam_debias=True``;
  that factor does not cancel in the trust ratio (it scales the step, not ``r``), so
  ``adam_debias=True`` there;
* weight decay: decoupled by default there, so ``weight_decouple=False`` there (decay
  added to the Adam direction before the ratio, as the paper and we do);
* ``phi``: it clamps ``||w||`` to ``[0, 10]``, so ``weight_norm_clamp=(0, 10)`` here (the
  problem has a layer with ``||w|| > 10`` so the clamp is exercised);
* its ratio is ``phi(||w||) / (||r|| + eps)`` with the Adam ``eps``, ours ``phi / ||r||``:
  with ``eps = 1e-8`` and ``||r|| >= 1`` the relative difference per step is below 1e-8.

Its global gradient clipping (``max_grad_norm``) applies only with ``pre_norm=True``,
off by default, so no clipping is involved.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from layerwise_problem import flat_parameters, gradients, make_problem, max_relative_error, train
from pytorch_optimizer import Lamb as ReferenceLamb
from torch._dynamo.utils import counters

from largebatch.optim import param_groups
from largebatch.optim.lamb import LAMB

STEPS = 60


def _problem_with_a_large_layer(steps):
    model, batches = make_problem(steps)
    with torch.no_grad():
        model[0].weight.mul_(20.0)
    assert model[0].weight.norm() > 10.0
    return model, batches


def _reference_comparison(weight_norm_clamp):
    model, batches = _problem_with_a_large_layer(STEPS)
    reference_model = copy.deepcopy(model)
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    ours = train(
        model,
        LAMB(
            model.parameters(),
            bias_correction=False,
            weight_norm_clamp=weight_norm_clamp,
            **hyper,
        ),
        batches,
    )
    reference = train(
        reference_model,
        ReferenceLamb(
            reference_model.parameters(), weight_decouple=False, adam_debias=True, **hyper
        ),
        batches,
    )
    return max_relative_error(ours, reference)


def test_follows_pytorch_optimizer_lamb():
    assert _reference_comparison(weight_norm_clamp=(0.0, 10.0)) < 1e-6


def test_reference_comparison_detects_a_different_phi():
    """Negative control: without the clamp the large layer moves differently."""
    assert _reference_comparison(weight_norm_clamp=None) > 1e-4


def paper_lamb(model, batches, *, lr, beta1, beta2, eps, weight_decay, ratio_clamp=None):
    """You et al. 2019, Alg. 2 (bias-corrected moments, phi = identity) for every tensor, float64.

    ``ratio_clamp = (low, high)`` clamps the ratio ``||w|| / ||r||`` (Shacklett et al. 2021).
    """
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    m = {name: torch.zeros_like(p) for name, p in params.items()}
    v = {name: torch.zeros_like(p) for name, p in params.items()}
    trajectory = []
    for t, batch in enumerate(batches, start=1):
        grads = gradients(model, params, batch)
        for name, w in params.items():
            g = grads[name]
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g * g
            m_hat = m[name] / (1 - beta1**t)
            v_hat = v[name] / (1 - beta2**t)
            r = m_hat / (v_hat.sqrt() + eps) + weight_decay * w
            ratio = w.norm() / r.norm()
            if ratio_clamp is not None:
                ratio = ratio.clamp(*ratio_clamp)
            params[name] = w - lr * ratio * r
        trajectory.append(flat_parameters(params))
    return trajectory


def test_matches_paper_equations():
    model, batches = make_problem(40, nonzero=True)
    hyper = dict(lr=2e-2, eps=1e-6, weight_decay=1e-2)
    expected = paper_lamb(copy.deepcopy(model), batches, beta1=0.9, beta2=0.999, **hyper)
    ours = train(model, LAMB(model.parameters(), betas=(0.9, 0.999), **hyper), batches)
    assert max_relative_error(ours, expected) < 1e-10


def _ratio_clamp_comparison(trust_ratio_clamp):
    model, batches = make_problem(30, nonzero=True)
    hyper = dict(lr=2e-2, eps=1e-6, weight_decay=1e-2)
    clamp = (0.15, 0.3)  # binds on both sides: step-1 ratios span 0.12-1.0 here
    expected = paper_lamb(
        copy.deepcopy(model), batches, beta1=0.9, beta2=0.999, ratio_clamp=clamp, **hyper
    )
    optimizer = LAMB(model.parameters(), trust_ratio_clamp=trust_ratio_clamp, **hyper)
    return max_relative_error(train(model, optimizer, batches), expected)


def test_trust_ratio_clamp_matches_paper_equations_with_a_clamped_ratio():
    assert _ratio_clamp_comparison((0.15, 0.3)) < 1e-10
    assert _ratio_clamp_comparison(None) > 1e-3  # negative control: the clamp binds


def test_group_without_trust_ratio_is_torch_adam():
    model, batches = make_problem(20)
    reference_model = copy.deepcopy(model)
    hyper = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    params = [{"params": model.parameters(), "trust_ratio": False}]
    ours = train(model, LAMB(params, **hyper), batches)
    reference = train(
        reference_model, torch.optim.Adam(reference_model.parameters(), **hyper), batches
    )
    assert max_relative_error(ours, reference) < 1e-12


def test_zero_parameter_takes_an_unscaled_step():
    weight = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    weight.grad = torch.randn(3, 2, dtype=torch.float64)
    LAMB([weight], lr=0.1, eps=0.0, weight_decay=1e-2).step()
    # Step 1 of bias-corrected Adam is g / |g| element-wise.
    torch.testing.assert_close(weight.detach(), -0.1 * weight.grad.sign())


def _trajectory_and_new_graphs(path_switch, options, steps=8):
    """Trajectory under a learning rate that changes every step, and graphs compiled after step 1."""
    model, batches = _problem_with_a_large_layer(steps)
    optimizer = LAMB(param_groups(model, 1e-2, layerwise=True), lr=1e-2, **options, **path_switch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    first = train(model, optimizer, batches[:1], scheduler)
    graphs = counters["stats"]["unique_graphs"]
    rest = train(model, optimizer, batches[1:], scheduler)
    return first + rest, counters["stats"]["unique_graphs"] - graphs


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias_correction": False, "weight_norm_clamp": (0.5, 10.0)},
        {"trust_ratio_clamp": (0.15, 0.3)},
    ],
    ids=["default", "no-bias-correction-clamped", "ratio-clamped"],
)
def test_single_multi_and_compiled_paths_agree(options):
    single, _ = _trajectory_and_new_graphs({"foreach": False}, options)
    multi, _ = _trajectory_and_new_graphs({"foreach": True}, options)
    compiled, new_graphs = _trajectory_and_new_graphs({"compiled": True}, options)
    assert max_relative_error(single, multi) < 1e-12
    assert max_relative_error(compiled, multi) < 1e-12
    assert new_graphs == 0  # changing learning rates did not recompile


@pytest.mark.parametrize(
    ("kwargs", "bad_value"),
    [
        ({"lr": -1e-3}, "-0.001"),
        ({"betas": (-0.1, 0.999)}, "-0.1"),
        ({"betas": (0.9, 1.0)}, "1.0"),
        ({"betas": (0.9,)}, "(0.9,)"),
        ({"eps": -1e-6}, "-1e-06"),
        ({"weight_decay": -0.01}, "-0.01"),
        ({"weight_norm_clamp": (2.0, 1.0)}, "(2.0, 1.0)"),
        ({"weight_norm_clamp": (-1.0, 1.0)}, "(-1.0, 1.0)"),
        ({"trust_ratio_clamp": (100.0, 0.01)}, "trust_ratio_clamp value: (100.0, 0.01)"),
        ({"compiled": True, "foreach": False}, "foreach=False"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, bad_value):
    with pytest.raises(ValueError, match=re.escape(bad_value)):
        LAMB([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_state_holds_tensor_step_counts():
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    optimizer = LAMB([weight])
    optimizer.step()
    optimizer.step()
    step = optimizer.state[weight]["step"]
    assert isinstance(step, torch.Tensor) and step.item() == 2.0
