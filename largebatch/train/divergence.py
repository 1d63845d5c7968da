"""Why a run diverged: which quantity became non-finite, at which step, and whether the data is.

Computed once, when the loop finds a non-finite loss, so a training step pays
nothing for it. The loop reads its losses every few steps (``step_losses.py``),
so the gradient and parameters are those of the step at which the loss was read;
the input data are those of the step whose loss was non-finite (the data stream
can hand out any batch again). Every flag is agreed on by all processes (one
all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from largebatch.tasks.base import Task
from largebatch.train import distributed
from largebatch.train.data import Batch, shard_batches
from largebatch.train.distributed import Distributed
from largebatch.train.plan import RunPlan
from largebatch.train.step_losses import StepLoss


@dataclass
class Divergence:
    """Where a run diverged and which quantities were non-finite there.

    ``quantity`` is what was found non-finite: the training ``loss`` of a step,
    or the training-set loss of an ``evaluation``. The flags say whether the
    gradient and the parameters (after the update of step ``checked_step``) and
    the input data (step ``step``'s batch, or the whole training set) were finite
    on every process; ``None`` where they could not be checked (the run failed
    after the loss had become non-finite).
    """

    step: int
    quantity: str
    value: str
    gradient_finite: bool | None
    parameters_finite: bool | None
    inputs_finite: bool | None
    checked_step: int | None = None

    @classmethod
    def at_step(
        cls, loss: StepLoss, batches: list[Batch], model: nn.Module, step: int, ddp: Distributed
    ) -> Divergence:
        """``loss`` is non-finite, ``batches`` are its step's, and ``step`` steps are done."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flags = _all_finite([grads, list(model.parameters()), [x for x, _ in batches]], ddp)
        return cls(loss.step, "loss", str(loss.value), *flags, checked_step=step)

    @classmethod
    def before_failure(cls, loss: StepLoss) -> Divergence:
        """``loss`` was non-finite, and a later step failed (nothing more is checked)."""
        return cls(loss.step, "loss", str(loss.value), None, None, None)

    @classmethod
    def at_evaluation(
        cls, step: int, model: nn.Module, task: Task, plan: RunPlan, ddp: Distributed
    ) -> Divergence:
        inputs = [x for x, _ in shard_batches(
            task.train, plan.eval_batch_size, ddp.rank, ddp.world_size, ddp.device
        )]  # fmt: skip
        parameters, data = _all_finite([list(model.parameters()), inputs], ddp)
        return cls(step, "evaluation", "non-finite", None, parameters, data, checked_step=step)

    def describe(self) -> str:
        """One line for ``RunResult.error``: where, what, and whether the data is to blame."""
        state = lambda ok: "finite" if ok else "non-finite"  # noqa: E731
        if self.quantity == "evaluation":
            what = f"the training-set loss evaluated at step {self.step} is non-finite"
            details = (
                f"parameters {state(self.parameters_finite)}, "
                f"training input data {state(self.inputs_finite)}"
            )
        else:
            what = f"the training loss of step {self.step} is {self.value}"
            model = (
                f"gradient {state(self.gradient_finite)}, "
                f"parameters {state(self.parameters_finite)} after the update"
            )
            data = f"input data {state(self.inputs_finite)}"
            if self.checked_step is None:
                return f"non-finite loss by step {self.step}: {what}"
            if self.checked_step == self.step:
                details = f"{model}, that step's {data}"
            else:
                details = f"that step's {data}; at step {self.checked_step}, when read: {model}"
        return f"non-finite loss by step {self.step}: {what} ({details})"


def _all_finite(groups: list[list[torch.Tensor]], ddp: Distributed) -> list[bool]:
    """For each group of tensors: whether every floating-point entry is finite on every process."""
    bad = torch.tensor(
        [
            sum(not bool(torch.isfinite(t).all()) for t in g if t.is_floating_point())
            for g in groups
        ],
        dtype=torch.float64,
        device=ddp.device,
    )
    return [count == 0 for count in distributed.all_reduce_sum(bad, ddp).tolist()]
