"""What the classical methods (SVRG, SAGA, Newton-CG, oLBFGS, SQN) need from whoever drives them.

:class:`~largebatch.optim.protocol.StepProtocol` says whether the driver computes a
gradient before ``step`` and whether ``step`` takes a closure. The classical
methods of Bottou, Curtis & Nocedal (2018) need four more things, declared by
:class:`ClassicalStepProtocol` (a ``StepProtocol``, so :func:`step_protocol_of`
returns it and a loop that knows only the base fields still reads it):

``closure_backward``
    ``True`` (the torch convention): a closure zeroes the gradients, computes the
    loss, calls ``backward`` and returns the loss. ``False``: a closure computes
    the loss on its batch at the current parameters and returns it **with its
    autograd graph, without calling backward**; the optimizer differentiates it
    (twice, for Hessian-vector products) and also calls it under
    ``torch.no_grad()`` when it only needs the value (line-search trials).
    Under DDP such a closure must run the unwrapped module (``autograd.grad``
    never fires DDP's hooks); the optimizer averages what it computes across
    ranks itself (:func:`~largebatch.optim.curvature.average_across_ranks`).

``hessian_sample``
    ``step`` accepts ``hessian_closure=``: a ``closure_backward=False`` closure on
    a separate Hessian sample ``S^H`` (a sub-sample of the step's batch, or a
    larger batch for SQN). The driver passes one whenever the optimizer's
    ``hessian_due`` is true (every step for Newton-CG, which otherwise uses the
    gradient sample; every ``update_every`` steps for SQN, which requires it).

``per_example``
    ``step(indices=..., per_example_grads=...)`` instead of a closure: the indices
    of the batch's examples in the finite training set and their gradients, one
    tensor per parameter with the batch as leading dimension (SAGA's table).

``snapshots``
    Before a ``step`` and whenever ``optimizer.snapshot_due`` is true, the
    driver calls ``optimizer.snapshot(closure)`` with a closure that accumulates
    the gradient of the mean loss over the **whole** training set into ``.grad``
    (a full pass, averaged across ranks like any gradient) and returns that loss
    (SVRG). A snapshot costs one pass over the data: ``n`` example gradients.

Every classical optimizer also implements :class:`ReportsStepStatistics`: after
each ``step`` (and ``snapshot``), ``step_statistics()`` returns the per-step
quantities a training loop records in ``metrics.csv`` (keys are documented per
optimizer and listed in ``STATISTICS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from largebatch.optim.protocol import StepProtocol


@dataclass(frozen=True)
class ClassicalStepProtocol(StepProtocol):
    """A :class:`StepProtocol` with what the classical methods add (module docstring).

    Attributes:
        closure_backward: closures call ``backward`` themselves (``True``) or
            return the loss with its graph and leave differentiation to the optimizer.
        hessian_sample: ``step`` takes ``hessian_closure=`` on a Hessian sample
            whenever ``optimizer.hessian_due`` is true.
        per_example: ``step(indices=..., per_example_grads=...)``.
        snapshots: ``snapshot(closure)`` over the whole training set whenever
            ``optimizer.snapshot_due`` is true.
    """

    closure_backward: bool = True
    hessian_sample: bool = False
    per_example: bool = False
    snapshots: bool = False


@runtime_checkable
class ReportsStepStatistics(Protocol):
    """An optimizer that reports per-step quantities for the metrics file."""

    STATISTICS: tuple[str, ...]

    def step_statistics(self) -> dict[str, float]:
        """The last step's quantities, one float per name in ``STATISTICS``."""
        ...
