"""How a training loop must drive an optimizer's ``step``.

Most optimizers want one gradient, computed by the loop, then ``step()``. The
extrapolation family and second-order methods evaluate gradients themselves
through ``step(closure)``. An optimizer declares which it needs with a
``step_protocol`` attribute; loops read it with :func:`step_protocol_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ClosureBatch = Literal["same", "fresh"]


@dataclass(frozen=True)
class StepProtocol:
    """What the loop does around ``optimizer.step``.

    Attributes:
        gradient_before_step: the loop computes loss and gradients at the current
            parameters before calling ``step``.
        closure: ``None`` if ``step()`` takes no closure; otherwise which data the
            closure must use each time it is called: ``"same"`` (the step's
            mini-batch again, as SAM and L-BFGS need) or ``"fresh"`` (a new
            mini-batch per call, as EXTRAP-SGD needs).
        local_first_gradient: under data parallelism the pre-step gradient is only
            needed on each rank locally (no all-reduce); the closure's gradients are
            averaged across ranks as usual.
        local_gradients: no gradient is ever averaged across ranks: the optimizer
            averages parameters with its neighbours itself (decentralized training), so
            the ranks' parameters differ. The loop does not wrap the model in DDP,
            checkpoints every rank and evaluates the ranks' average.
    """

    gradient_before_step: bool = True
    closure: ClosureBatch | None = None
    local_first_gradient: bool = False
    local_gradients: bool = False


STANDARD = StepProtocol()


def step_protocol_of(optimizer: torch.optim.Optimizer) -> StepProtocol:
    """The protocol an optimizer declares, or the standard one."""
    return getattr(optimizer, "step_protocol", STANDARD)
