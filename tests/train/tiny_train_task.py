"""A tiny task and probe optimizers for the training-loop tests.

Importable as ``tiny_train_task:build`` by the CLI (the tests run it with this
directory on ``PYTHONPATH``), so subprocess runs and in-process runs train the
very same problem.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from largebatch.optim import OptimizerSpec, StepProtocol
from largebatch.tasks import Task
from largebatch.train.checkpoint import load_latest

TINY_TASK = "tiny_train_task:build"


class SlowModel(nn.Module):
    """An MLP (optional dropout, which draws from torch's global RNG) that can sleep in
    ``forward``, so that a subprocess run is slow enough to kill."""

    def __init__(
        self, dim: int, classes: int, delay: float, dropout: float, fail_after: int = 0
    ) -> None:
        super().__init__()
        self.fail_after = fail_after
        self.training_calls = 0
        self.net = nn.Sequential(
            nn.Linear(dim, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, classes)
        )
        self.delay = delay

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.training_calls += 1
            if self.fail_after and self.training_calls > self.fail_after:
                raise RuntimeError("disk on fire")
        if self.delay and self.training:
            time.sleep(self.delay)
        return self.net(inputs)


def build(
    num_train: int = 128,
    dim: int = 6,
    classes: int = 3,
    delay: float = 0.0,
    dropout: float = 0.0,
    fail_after: int = 0,
    broken: bool = False,
    nan_inputs: bool = False,
) -> Task:
    """Gaussian inputs labelled by a fixed random linear map; a small MLP.

    Inputs carry their example index in the last feature (scaled down), so tests
    can tell which examples a forward pass saw. ``fail_after`` > 0 makes the
    model raise on its training forward passes after that many; ``broken`` makes
    this function raise; ``nan_inputs`` puts a NaN into every training input.
    """
    if broken:
        raise RuntimeError("the data server is down")
    generator = torch.Generator().manual_seed(1234)
    total = num_train + 64
    inputs = torch.randn(total, dim, generator=generator)
    inputs[:, -1] = torch.arange(total) / 1000.0
    if nan_inputs:
        inputs[:num_train, 0] = float("nan")
    targets = (inputs @ torch.randn(dim, classes, generator=generator)).argmax(dim=1)
    train = TensorDataset(inputs[:num_train], targets[:num_train])
    test = TensorDataset(inputs[num_train:], targets[num_train:])
    return Task(
        name="tiny_train_task:build",
        train=train,
        test=test,
        build_model=lambda: SlowModel(dim, classes, delay, dropout, fail_after),
        loss_fn=F.cross_entropy,
        target_metric=("accuracy", 0.99),
    )


class ProtocolProbe(torch.optim.SGD):
    """Plain SGD that declares a step protocol and records, in its state, what the loop did.

    The state of the first parameter (saved in checkpoints) counts the steps that
    arrived with a gradient already computed and the closure calls, and keeps the
    last step's pre-step gradient and last closure gradient. The update uses the
    gradient left by the last closure call (or the loop's, without closure).
    """

    def __init__(
        self,
        params,
        lr: float = 0.1,
        gradient_before_step: bool = True,
        closure: str | None = "same",
        local_first_gradient: bool = False,
        closure_calls: int = 1,
    ) -> None:
        super().__init__(params, lr=lr)
        self.step_protocol = StepProtocol(gradient_before_step, closure, local_first_gradient)
        self.closure_calls = closure_calls

    def step(self, closure=None):
        first = self.param_groups[0]["params"][0]
        record = self.state[first]
        zero = torch.zeros(())
        record["steps_with_gradient"] = record.get("steps_with_gradient", zero) + (
            first.grad is not None
        )
        if first.grad is not None:
            record["first_grad"] = first.grad.clone()
        loss = None
        if self.step_protocol.closure is not None:
            for _ in range(self.closure_calls):
                with torch.enable_grad():
                    loss = closure()
                record["closure_calls"] = record.get("closure_calls", zero) + 1
                record["closure_grad"] = first.grad.clone()
        super().step()
        return loss


PROBE_SPEC = OptimizerSpec(
    name="protocol-probe",
    target="tiny_train_task:ProtocolProbe",
    description="test optimizer recording the loop's step protocol",
    defaults={"lr": 0.1},
)


def final_checkpoint(out_dir: str) -> dict:
    """The newest checkpoint of a run directory."""
    found = load_latest(Path(out_dir) / "checkpoints")
    assert found is not None, f"no checkpoint in {out_dir}"
    return found[0]


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def read_metrics(out_dir: str) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv."""
    return list(csv.DictReader(io.StringIO((Path(out_dir) / "metrics.csv").read_text())))
