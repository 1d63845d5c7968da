"""LARS against pytorch-optimizer's LARS, a float64 re-derivation of the paper, and torch's SGD.

pytorch-optimizer 4.1 ``LARS`` and ours coincide when (a) its rule "1-D tensors get
neither weight decay nor the trust ratio" is our ``param_groups(..., layerwise=True)``
default, (b) ``eps = 0`` (its ratio has no eps) and (c) every gradient norm is
non-zero: it returns a ratio of 1 only where ``||w||`` or ``||g|| + wd ||w||`` is 0,
we where ``||w||`` or ``||g||`` is 0. Both put the learning rate outside the momentum
buffer (torch SGD's convention), and its zero-initialised buffer with dampening 0
equals ours.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from layerwise_problem import flat_parameters, gradients, make_problem, max_relative_error, train
from pytorch_optimizer import LARS as ReferenceLARS
from torch._dynamo.utils import counters

import largebatch.optim._compiled as compiled_module
from largebatch.optim import param_groups
from largebatch.optim.lars import LARS

STEPS = 60


@pytest.mark.parametrize("nesterov", [False, True])
def test_follows_pytorch_optimizer_lars(nesterov):
    model, batches = make_problem(STEPS)
    reference_model = copy.deepcopy(model)
    hyper = dict(lr=1.0, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    ours = train(
        model, LARS(param_groups(model, 1e-2, layerwise=True), trust_coef=0.02, **hyper), batches
    )
    reference = train(
        reference_model,
        ReferenceLARS(reference_model.parameters(), trust_coefficient=0.02, **hyper),
        batches,
    )
    assert max_relative_error(ours, reference) < 1e-10


def test_reference_comparison_detects_a_different_rule():
    """Negative control: the trust ratio on 1-D tensors too moves the trajectory far away."""
    model, batches = make_problem(STEPS)
    reference_model = copy.deepcopy(model)
    hyper = dict(lr=1.0, momentum=0.9, weight_decay=1e-2)
    ours = train(model, LARS(model.parameters(), trust_coef=0.02, **hyper), batches)
    reference = train(
        reference_model,
        ReferenceLARS(reference_model.parameters(), trust_coefficient=0.02, **hyper),
        batches,
    )
    assert max_relative_error(ours, reference) > 1e-3


def paper_lars(model, batches, *, lr, momentum, weight_decay, eta, nesterov=False, clip=False):
    """You et al. 2017, Alg. 1 for every tensor, in float64, plus the LARC clip and Nesterov.

    The paper folds the global rate into the momentum: ``v = m v + lr * local_lr * (g + wd w)``
    and ``w = w - v``. LARC (apex) scales the gradient by ``min(local_lr / lr, 1)`` before
    SGD; Nesterov uses torch SGD's form ``w = w - lr (u + m v)``. Returns the trajectory
    and how many tensor-steps the clip was active.
    """
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    velocity = {name: torch.zeros_like(p) for name, p in params.items()}
    trajectory, clipped = [], 0
    for batch in batches:
        grads = gradients(model, params, batch)
        for name, w in params.items():
            g = grads[name]
            local_lr = eta * w.norm() / (g.norm() + weight_decay * w.norm())
            if clip:
                clipped += int(local_lr / lr > 1)
                local_lr = torch.clamp(local_lr / lr, max=1.0)
            update = lr * local_lr * (g + weight_decay * w)
            velocity[name] = momentum * velocity[name] + update
            step = update + momentum * velocity[name] if nesterov else velocity[name]
            params[name] = w - step
        trajectory.append(flat_parameters(params))
    return trajectory, clipped


@pytest.mark.parametrize(
    "options",
    [{}, {"nesterov": True}, {"clip": True}],
    ids=["plain", "nesterov", "larc-clip"],
)
def test_matches_paper_equations(options):
    model, batches = make_problem(40, nonzero=True)
    hyper = dict(lr=0.5, momentum=0.9, weight_decay=5e-3)
    eta = 0.2 if options.get("clip") else 0.02
    expected, clipped = paper_lars(copy.deepcopy(model), batches, eta=eta, **hyper, **options)
    if options.get("clip"):
        assert 0 < clipped < len(batches) * len(list(model.parameters()))  # both regimes occur
    ours = train(model, LARS(model.parameters(), trust_coef=eta, **hyper, **options), batches)
    assert max_relative_error(ours, expected) < 1e-10


@pytest.mark.parametrize("nesterov", [False, True])
def test_group_without_trust_ratio_is_torch_sgd(nesterov):
    model, batches = make_problem(20)
    reference_model = copy.deepcopy(model)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    ours = train(
        model, LARS([{"params": model.parameters(), "trust_ratio": False}], **hyper), batches
    )
    reference = train(
        reference_model, torch.optim.SGD(reference_model.parameters(), **hyper), batches
    )
    assert max_relative_error(ours, reference) < 1e-12


def test_zero_parameter_takes_an_unscaled_step():
    weight = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    weight.grad = torch.randn(3, 2, dtype=torch.float64)
    LARS([weight], lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coef=1e-3).step()
    torch.testing.assert_close(weight.detach(), -0.1 * weight.grad)


def _trajectory_and_new_graphs(path_switch, options, steps=8):
    """Trajectory under a learning rate that changes every step, and graphs compiled after step 1."""
    model, batches = make_problem(steps)
    optimizer = LARS(
        param_groups(model, 1e-2, layerwise=True), lr=1.0, trust_coef=0.02, **options, **path_switch
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    first = train(model, optimizer, batches[:1], scheduler)
    graphs = counters["stats"]["unique_graphs"]
    rest = train(model, optimizer, batches[1:], scheduler)
    return first + rest, counters["stats"]["unique_graphs"] - graphs


@pytest.mark.parametrize(
    "options", [{}, {"nesterov": True, "clip": True, "eps": 1e-8}], ids=["plain", "nesterov-clip"]
)
def test_single_multi_and_compiled_paths_agree(options):
    single, _ = _trajectory_and_new_graphs({"foreach": False}, options)
    multi, _ = _trajectory_and_new_graphs({"foreach": True}, options)
    compiled, new_graphs = _trajectory_and_new_graphs({"compiled": True}, options)
    assert max_relative_error(single, multi) < 1e-12
    assert max_relative_error(compiled, multi) < 1e-12
    assert new_graphs == 0  # changing learning rates did not recompile


def test_compiled_path_chunks_and_non_contiguous_tensors(monkeypatch):
    """Chunks of several tensors plus a remainder, and a channels-last tensor run eagerly."""
    monkeypatch.setattr(compiled_module, "CHUNK_SIZE", 2)
    generator = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 2), (7, 1), (6,)]
    values = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    values.append(
        torch.randn(4, 3, 2, 2, generator=generator, dtype=torch.float64).to(
            memory_format=torch.channels_last
        )
    )
    results = []
    for switch in ({"foreach": True}, {"compiled": True}):
        params = [torch.nn.Parameter(v.clone(memory_format=torch.preserve_format)) for v in values]
        optimizer = LARS(params, lr=0.3, trust_coef=0.05, weight_decay=1e-2, **switch)
        for step in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + 0.01 * p.detach()
            optimizer.step()
        results.append(params)
    assert not results[1][-1].is_contiguous()
    for ours, expected in zip(*results[::-1]):
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "bad_value"),
    [
        ({"lr": -0.1}, "-0.1"),
        ({"momentum": -0.5}, "-0.5"),
        ({"momentum": 1.0}, "1.0"),
        ({"weight_decay": -1e-4}, "-0.0001"),
        ({"trust_coef": -1e-3}, "-0.001"),
        ({"eps": -1e-8}, "-1e-08"),
        ({"nesterov": True, "momentum": 0.0}, "momentum"),
        ({"compiled": True, "foreach": False}, "foreach=False"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, bad_value):
    with pytest.raises(ValueError, match=re.escape(bad_value)):
        LARS([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_group_hyperparameter_raises():
    optimizer = LARS([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="-2.0"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -2.0})
