"""The learning-rate range test: a short run whose rate rises exponentially until the loss blows up.

L. N. Smith, "Cyclical Learning Rates for Training Neural Networks" (WACV 2017,
arXiv 1506.01186), in the form fastai's ``lr_find`` made common: the rate of
step ``i`` of ``n`` is ``start_lr (end_lr / start_lr) ** (i / (n - 1))``; the
loss is smoothed by a bias-corrected exponential moving average; the test stops
when the smoothed loss exceeds ``blow_up`` times its best (or a loss is not
finite). Two suggestions are read off the smoothed curve: the rate where it
falls fastest (per unit of log rate) and a tenth of the rate at its minimum.

Run it at the batch size you will train with: the usable range moves with the
batch. Rates are absolute (no scaling rule). The smoothing lags: on a quadratic
the blow-up is found about ``exp(sqrt(c ln q))`` times past the stability limit,
``q`` being the ratio of consecutive rates and ``c`` a few units, so a sweep
over fewer decades or in more steps locates it more tightly (docs/training.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from largebatch.tasks import get_task
from largebatch.tasks.base import Task
from largebatch.train.config import RunConfig
from largebatch.train.data import BatchStream
from largebatch.train.distributed import pick_device
from largebatch.train.loop import seed_everything
from largebatch.train.plan import build_optimizer, plan_run
from largebatch.train.step import StepDriver
from largebatch.utils.errors import ConfigError
from largebatch.utils.values import is_number


@dataclass(frozen=True)
class RangeTestSettings:
    """The sweep: ``steps`` rates from ``start_lr`` to ``end_lr``, geometrically spaced.

    ``smoothing`` is the moving-average factor of the loss, ``blow_up`` the factor
    over the best smoothed loss at which the test stops. Defaults are fastai's.
    """

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    smoothing: float = 0.98
    blow_up: float = 4.0

    def __post_init__(self) -> None:
        for name in ("start_lr", "end_lr"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value < math.inf:
                raise ConfigError(f"Invalid {name}: {value!r} (must be a number > 0)")
        if self.start_lr >= self.end_lr:
            raise ConfigError(
                f"Invalid start_lr: {self.start_lr!r} is not below end_lr={self.end_lr!r} "
                "(the sweep rises from the minimum to the maximum)"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 3:
            raise ConfigError(f"Invalid steps: {self.steps!r} (must be an integer >= 3)")
        if not is_number(self.smoothing) or not 0 <= self.smoothing < 1:
            raise ConfigError(f"Invalid smoothing: {self.smoothing!r} (must be in [0, 1))")
        if not is_number(self.blow_up) or not self.blow_up > 1:
            raise ConfigError(f"Invalid blow_up: {self.blow_up!r} (must be > 1)")

    def rate(self, step: int) -> float:
        """The rate of (0-based) step ``step``."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.steps - 1))


@dataclass
class RangeTestResult:
    """What the sweep saw and suggests.

    ``lrs[i]`` is the rate of step ``i``, ``losses[i]`` the loss of its batch
    before its update and ``smoothed[i]`` the moving average. ``stopped`` is
    "blow-up" (the smoothed loss passed ``blow_up`` times its best), "non-finite"
    or "end" (the sweep ended first); ``blow_up_lr`` is the rate of the step that
    stopped it. The suggestions use the smoothed curve before that step:
    ``steepest_lr`` where it falls fastest against log(rate), ``minimum_lr`` where
    it is lowest; ``suggested_lr`` is ``minimum_lr / 10``.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str
    blow_up_lr: float | None
    minimum_lr: float | None
    steepest_lr: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def suggested_lr(self) -> float | None:
        return None if self.minimum_lr is None else self.minimum_lr / 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"suggested_lr": self.suggested_lr}


def check_range_test(config: RunConfig) -> None:
    """``ConfigError`` for a config the range test cannot run (it trains in one process)."""
    if config.nproc != 1:
        raise ConfigError(f"Invalid nproc: {config.nproc} (the range test runs in one process)")
    if config.batch_growth is not None:
        raise ConfigError(
            f"Invalid batch_growth: {config.batch_growth!r} (the range test runs at one batch "
            "size, the one you will train with)"
        )


def range_test(
    config: RunConfig, settings: RangeTestSettings | None = None, task: Task | None = None
) -> RangeTestResult:
    """Run the range test on ``config``'s task, optimizer, batch and seed (one process).

    The config's rate, scaling and schedule are ignored: the sweep sets the rate.
    ``task`` replaces ``config.task`` by a task built in code. Raises
    ``ConfigError`` before training if the loss at the initial parameters is not
    finite (nothing to sweep), or as :func:`~largebatch.train.train` would for a
    bad config.
    """
    settings = settings if settings is not None else RangeTestSettings()
    check_range_test(config)
    task = task if task is not None else get_task(config.task, **config.task_options)
    plan = plan_run(config, task, world_size=1)
    device = pick_device(config.device)
    seed_everything(config.seed)
    autocast = (
        partial(torch.autocast, device.type, torch.bfloat16)
        if config.bf16
        else contextlib.nullcontext
    )
    sampler = DistributedSampler(task.train, 1, 0, shuffle=True, seed=config.seed, drop_last=True)
    stream = BatchStream(
        task.train, sampler, plan.micro_batch_size, plan.accumulation_steps, device
    )
    model = task.build_model().to(device)
    optimizer, _ = build_optimizer(config, plan, model)
    driver = StepDriver(
        model, optimizer, task.loss_fn, autocast=autocast,
        hessian_batch_size=config.hessian_batch_size, full_pass_batch_size=plan.eval_batch_size,
    )  # fmt: skip
    _check_initial_loss(model, stream, task, autocast)

    base_lrs = [group["lr"] for group in optimizer.param_groups]
    lrs, losses, smoothed = [], [], []
    average, best, stopped = 0.0, math.inf, "end"
    for i in range(settings.steps):
        rate = settings.rate(i)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = rate * base / base_lrs[0]  # groups keep their ratios
        value = float(driver.step(stream).loss)
        average = settings.smoothing * average + (1 - settings.smoothing) * value
        current = average / (1 - settings.smoothing ** (i + 1))
        lrs.append(rate)
        losses.append(value)
        smoothed.append(current)
        if not math.isfinite(value) or not math.isfinite(current):
            stopped = "non-finite"
            break
        if i > 0 and current > settings.blow_up * best:
            stopped = "blow-up"
            break
        best = min(best, current)

    usable = np.array(smoothed if stopped == "end" else smoothed[:-1])
    minimum_lr = lrs[int(np.argmin(usable))] if usable.size else None
    steepest_lr = None
    if usable.size >= 3:
        slopes = np.gradient(usable, np.log(lrs[: usable.size]))
        steepest_lr = lrs[int(np.argmin(slopes))]
    return RangeTestResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        stopped=stopped,
        blow_up_lr=lrs[-1] if stopped != "end" else None,
        minimum_lr=minimum_lr,
        steepest_lr=steepest_lr,
        settings=asdict(settings),
        config=config.to_dict(),
    )


def _check_initial_loss(model: torch.nn.Module, stream: BatchStream, task: Task, autocast) -> None:
    """``ConfigError`` if the first batch's loss at the initial parameters is not finite.

    Evaluated in eval mode (no dropout draw), and the stream is rewound, so the
    sweep itself is the same with or without this check.
    """
    model.eval()
    with torch.no_grad(), autocast():
        micro_batches = stream.next()
        loss = sum(task.loss_fn(model(x), y) for x, y in micro_batches) / len(micro_batches)
    stream.position = 0
    model.train()
    if not math.isfinite(float(loss)):
        raise ConfigError(
            f"Invalid task {task.name!r}: its loss at the initial parameters is {float(loss)} "
            "on the first training batch, before any update; the range test needs a finite loss"
        )
