"""Resolve a (valid) :class:`RunConfig` against its task into the numbers a run follows.

:func:`plan_run` needs the training-set size: it resolves every ``None``
(learning rate, scaling rule, warm-up, evaluation interval) from the
optimizer's registry recommendation and checks what only the data can tell (the
batch fits in the training set, the warm-up is shorter than the run, the target
names a metric of the task). :func:`build_optimizer` builds the optimizer and
checks its step protocol. Both raise ``ConfigError`` naming the bad value, so a
misconfigured run stops before anything is written. :func:`build_scheduler`
builds the learning-rate scheduler the plan's schedule calls for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from largebatch.optim import StepProtocol, create_optimizer, step_protocol_of
from largebatch.optim.registry import get_spec, optimizer_arguments
from largebatch.tasks.base import Task
from largebatch.train import schedules
from largebatch.train.adascale import AdaScale, AdaScaleSchedule
from largebatch.train.autowu import AutoWU, AutoWUSchedule
from largebatch.train.batch_growth import STATISTICS_OPTIONS, batch_multiple
from largebatch.train.config import RunConfig
from largebatch.train.distributed import Distributed
from largebatch.train.noise_scale import NoiseScaleMonitor, noise_scale_source
from largebatch.train.schedules import RunScheduler, WarmupThenDecay, scale_lr
from largebatch.utils.errors import ConfigError


@dataclass(frozen=True)
class Target:
    """Stop or record when ``metric`` on ``split`` reaches ``value``.

    "Reached" means ``<= value`` for ``loss`` and ``>= value`` for any other metric.
    """

    split: str
    metric: str
    value: float

    def reached(self, metrics: dict[str, dict[str, float]]) -> bool:
        current = metrics[self.split][self.metric]
        return current <= self.value if self.metric == "loss" else current >= self.value


def resolve_target(target: tuple[str, float] | None, task: Task) -> Target | None:
    """``(name, value)`` -> :class:`Target`; ``name`` is ``metric`` or ``split_metric``.

    Without a split prefix the validation split is used, or test if the task has none.
    ``None`` falls back to the task's own target.
    """
    target = target if target is not None else task.target_metric
    if target is None:
        return None
    name, value = target
    splits = ["train", "test"] + (["val"] if task.val is not None else [])
    split, _, metric = name.partition("_")
    if split not in splits or not metric:
        split, metric = ("val" if task.val is not None else "test"), name
    metrics = ["loss", *task.metrics]
    if metric not in metrics:
        raise ConfigError(
            f"Invalid target metric: {name!r} (task {task.name!r} has {', '.join(metrics)}, "
            f"optionally prefixed by one of {', '.join(s + '_' for s in splits)})"
        )
    return Target(split, metric, float(value))


@dataclass(frozen=True)
class RunPlan:
    """The numbers a run follows, all derived from the config and the data size.

    ``micro_batch_size`` is what one device processes per forward/backward;
    ``batch_size = micro_batch_size * world_size * accumulation_steps``.
    ``total_steps`` is the most steps the run takes: AdaScale ends earlier, once
    its scale-invariant progress has covered ``schedule.base``. ``lr`` is the rate
    the optimizer is built with: the scaled peak; the base rate under AdaScale
    (its gain scales it); AutoWU's ``max_lr``. With batch growth, ``batch_size``
    is the first batch, ``max_batch_size`` the largest, and an epochs or examples
    budget is ``total_examples`` (the run stops when it has read them;
    ``total_steps`` is then the most steps it can take, at the first batch size).
    """

    world_size: int
    batch_size: int
    accumulation_steps: int
    micro_batch_size: int
    steps_per_epoch: int
    total_steps: int
    base_lr: float
    scaling: str
    lr: float
    schedule: WarmupThenDecay | AutoWUSchedule | AdaScaleSchedule
    eval_every: int
    eval_batch_size: int
    target: Target | None
    num_train: int = 0
    max_batch_size: int | None = None
    total_examples: int | None = None

    def finished(self, steps: int, examples: int) -> bool:
        """Whether a run that has taken ``steps`` steps and read ``examples`` examples is done."""
        over = self.total_examples is not None and examples >= self.total_examples
        return steps >= self.total_steps or over

    def evaluation_due(self, steps: int, examples: int, read: int) -> bool:
        """Whether to evaluate after ``steps`` steps, ``examples`` examples read (``read`` by
        the last step): every ``eval_every`` steps; on an examples budget with a growing
        batch, whenever the examples pass a multiple of ``eval_every`` first batches (so
        evaluations stay evenly spread over the data as the steps get larger)."""
        if self.total_examples is None:
            return steps % self.eval_every == 0
        interval = self.eval_every * self.batch_size
        return examples // interval > (examples - read) // interval


def plan_run(config: RunConfig, task: Task, world_size: int | None = None) -> RunPlan:
    """Resolve ``config`` against ``task`` (its training-set size and metrics).

    ``world_size`` is the number of processes actually running (default
    ``config.nproc``). Raises ``ConfigError`` if the batch does not fit in the
    data, the warm-up is not shorter than the run or the target is not a metric.
    """
    world_size = config.nproc if world_size is None else world_size
    if world_size != config.nproc:
        raise ConfigError(
            f"nproc={config.nproc} but {world_size} process(es) are running; launch with "
            f"`largebatch run --nproc {config.nproc}` or torchrun --nproc-per-node {config.nproc}"
        )
    num_train = len(task.train)
    if config.batch_size > num_train:
        raise ConfigError(
            f"Invalid batch_size: {config.batch_size} is larger than the training set "
            f"({num_train} examples)"
        )
    spec = get_spec(config.optimizer)
    micro_batch_size = config.batch_size // (world_size * config.accumulation_steps)
    steps_per_epoch = num_train // config.batch_size

    budget, amount = config.budget()
    if budget == "steps":
        total_steps = amount
    elif budget == "examples":
        total_steps = math.ceil(amount / config.batch_size)
    else:
        total_steps = max(1, round(amount * steps_per_epoch))
    total_examples = None
    max_batch_size = None
    if config.batch_growth is not None:
        if budget != "steps":
            total_examples = amount if budget == "examples" else total_steps * config.batch_size
        max_batch_size = _max_batch_size(config, num_train, world_size)
    if config.hessian_batch_size is not None and config.hessian_batch_size > num_train:
        raise ConfigError(
            f"Invalid hessian_batch_size: {config.hessian_batch_size} is larger than the "
            f"training set ({num_train} examples)"
        )

    base_lr, scaling, schedule = _resolve_schedule(config, spec, total_steps, steps_per_epoch)
    if isinstance(schedule, AdaScaleSchedule):
        total_steps = schedule.most_steps
    return RunPlan(
        world_size=world_size,
        batch_size=config.batch_size,
        accumulation_steps=config.accumulation_steps,
        micro_batch_size=micro_batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        base_lr=base_lr,
        scaling=scaling,
        lr=scale_lr(base_lr, config.batch_size, config.base_batch_size, scaling),
        schedule=schedule,
        eval_every=config.eval_every or min(steps_per_epoch, total_steps),
        eval_batch_size=config.eval_batch_size or micro_batch_size,
        target=resolve_target(config.target, task),
        num_train=num_train,
        max_batch_size=max_batch_size,
        total_examples=total_examples,
    )


def _max_batch_size(config: RunConfig, num_train: int, world_size: int) -> int:
    """The largest batch of a growing run: as asked, or the most the data holds on the grid."""
    statistics = {k: v for k, v in config.batch_growth_options.items() if k in STATISTICS_OPTIONS}
    grid = batch_multiple(world_size, config.accumulation_steps, statistics.get("group_size", 1))
    fits = (num_train // world_size) * world_size // grid * grid
    if config.max_batch_size is None:
        return fits
    if config.max_batch_size > fits:
        raise ConfigError(
            f"Invalid max_batch_size: {config.max_batch_size} is larger than the training set "
            f"holds ({fits} examples on the grid of {grid})"
        )
    return config.max_batch_size


def _resolve_schedule(
    config: RunConfig, spec, total_steps: int, steps_per_epoch: int
) -> tuple[float, str, WarmupThenDecay | AutoWUSchedule | AdaScaleSchedule]:
    """The base learning rate, the scaling rule and the schedule of the run."""
    if config.schedule == "autowu":
        cap = max(1, math.floor(config.autowu_max_warmup * total_steps))
        autowu = AutoWUSchedule(
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            warmup_steps=cap,
            min_lr=config.autowu_min_lr,
            max_lr=config.autowu_max_lr,
            decay=config.autowu_decay,
            seed=config.seed,
        )
        return config.autowu_max_lr, "none", autowu
    if config.warmup_steps is not None:
        warmup_steps = config.warmup_steps
    elif config.warmup_epochs is not None:
        warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    else:
        warmup_steps = round(spec.warmup * total_steps)
    if warmup_steps >= total_steps:
        raise ConfigError(
            f"Invalid warm-up: {warmup_steps} steps is not shorter than the run "
            f"({total_steps} steps)"
        )
    base_lr = config.lr
    if base_lr is None:
        base_lr = optimizer_arguments(config.optimizer, config.optimizer_options.get("base")).lr
    scaling = config.scaling if config.scaling is not None else spec.scaling_rule
    scale = config.batch_size / config.base_batch_size if scaling == "adascale" else 1
    schedule = WarmupThenDecay(
        total_steps=round(scale * total_steps),  # AdaScale: in base-batch steps
        warmup_steps=round(scale * warmup_steps),
        decay=config.schedule,
        power=config.decay_power,
        milestones=tuple(config.decay_milestones),
        gamma=config.decay_gamma,
        warmup_start=config.warmup_start,
        floor=config.decay_floor,
    )
    if scaling == "adascale":
        return (
            base_lr,
            scaling,
            AdaScaleSchedule(schedule, config.base_batch_size, config.batch_size),
        )
    return base_lr, scaling, schedule


def build_scheduler(
    plan: RunPlan, optimizer: torch.optim.Optimizer, noise: NoiseScaleMonitor, ddp: Distributed
) -> RunScheduler:
    """The learning-rate scheduler of the plan: fixed, AutoWU or AdaScale.

    AdaScale reads its gain from ``noise``'s averages; AutoWU decides on rank 0 of ``ddp``.
    """
    if isinstance(plan.schedule, AutoWUSchedule):
        return AutoWU(optimizer, plan.schedule, ddp)
    if isinstance(plan.schedule, AdaScaleSchedule):
        return AdaScale(optimizer, plan.schedule, noise.tracker)
    return schedules.build_scheduler(optimizer, plan.schedule)


def build_optimizer(
    config: RunConfig, plan: RunPlan, params: nn.Module | Iterable[torch.Tensor]
) -> tuple[torch.optim.Optimizer, StepProtocol]:
    """The run's optimizer over ``params`` at the plan's learning rate, and its step protocol.

    Its constructor judges its hyperparameters (``TypeError`` for an unknown name,
    ``ValueError`` for a bad value, as ``torch.optim`` does); a protocol the loop
    cannot follow, or ``noise_scale=True`` that it cannot honour, is a
    ``ConfigError``. Data arguments (SAGA's ``num_examples``) come from the plan.
    Called with a stand-in parameter, it checks all this without the model.
    """
    options = dict(config.optimizer_options)
    if config.topology is not None:
        options["topology"] = config.topology
    data = {"num_examples": plan.num_train}
    options.update({key: data[key] for key in get_spec(config.optimizer).data_arguments})
    optimizer = create_optimizer(config.optimizer, params, lr=plan.lr, **options)
    protocol = step_protocol_of(optimizer)
    if (
        not protocol.gradient_before_step
        and protocol.closure is None
        and not getattr(protocol, "per_example", False)
    ):
        raise ConfigError(f"Optimizer {config.optimizer!r} declares neither gradient nor closure")
    noise_scale_source(config, protocol)
    return optimizer, protocol
