"""The functional API (``largebatch.optim.functional``) is the classes' step, usable on its own.

Driven by hand on lists of tensors with buffers the caller owns, each function follows
its class bit for bit, and its buffers equal the class's state.
"""

from __future__ import annotations

import pytest
import torch

from largebatch.optim.alto import ALTO
from largebatch.optim.functional import alto, lamb, lars
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS

HYPERPARAMETERS = {
    "lars": dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coef=0.02, nesterov=True),
    "lamb": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    "alto": dict(lr=1e-2, betas=(0.8, 0.99), alpha=-2.0, e_beta1=0.9, weight_decay=1e-2),
}
CASES = {
    # class, function, buffer keys in the function's order, whether it counts steps
    "lars": (LARS, lars, ("momentum_buffer",), False),
    "lamb": (LAMB, lamb, ("exp_avg", "exp_avg_sq"), True),
    "alto": (ALTO, alto, ("grad_ema", "exp_avg", "exp_avg_sq"), True),
}


def _functional_arguments(name: str) -> dict:
    hyperparameters = dict(HYPERPARAMETERS[name])
    if "betas" in hyperparameters:
        hyperparameters["beta1"], hyperparameters["beta2"] = hyperparameters.pop("betas")
    if name == "alto":
        hyperparameters.update(eps=1e-6, eps2=1e-6, eps3=1e-10)
    if name == "lars":
        hyperparameters.update(eps=0.0, clip=False)
    return hyperparameters


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}], ids=["single", "foreach"])
@pytest.mark.parametrize("name", CASES)
def test_function_follows_its_class(name, path):
    cls, function, keys, counts_steps = CASES[name]
    assert cls.functional is function
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    initial = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    gradients = [
        [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes] for _ in range(4)
    ]

    params = [torch.nn.Parameter(t.clone()) for t in initial]
    optimizer = cls(params, **HYPERPARAMETERS[name], **path)
    tensors = [t.clone() for t in initial]
    buffers = [[torch.zeros_like(t) for t in tensors] for _ in keys]
    steps = [[torch.zeros(()) for _ in tensors]] if counts_steps else []
    for step_gradients in gradients:
        for param, grad in zip(params, step_gradients):
            param.grad = grad.clone()
        optimizer.step()
        function(tensors, step_gradients, *buffers, *steps, **_functional_arguments(name), **path)

    for param, tensor in zip(params, tensors):
        assert torch.equal(param.detach(), tensor)
    for key, buffer in zip(keys, buffers):
        for param, value in zip(params, buffer):
            assert torch.equal(optimizer.state[param][key], value)
    assert not torch.equal(tensors[0], initial[0])
