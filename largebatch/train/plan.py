"""Check a :class:`RunConfig` and turn it into concrete numbers before training starts.

:func:`validate` needs only the config (the CLI and sweeps call it up front);
:func:`plan_run` also needs the training-set size and resolves every ``None``
(learning rate, scaling rule, warm-up, evaluation interval) from the optimizer's
registry recommendation. Both raise ``ValueError`` naming the bad value, so a
misconfigured run never starts.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from largebatch.optim.registry import OptimizerSpec, get_spec
from largebatch.tasks.base import Task
from largebatch.train.config import RunConfig
from largebatch.train.distributed import check_device
from largebatch.train.schedules import DECAYS, SCALING_RULES, WarmupThenDecay, scale_lr

# files whose presence means a run directory already holds a run
RUN_FILES = ("metrics.csv", "result.json", "checkpoints")


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
        raise ValueError(
            f"Invalid target metric: {name!r} (task {task.name!r} has {', '.join(metrics)}, "
            f"optionally prefixed by one of {', '.join(s + '_' for s in splits)})"
        )
    return Target(split, metric, float(value))


@dataclass(frozen=True)
class RunPlan:
    """The numbers a run follows, all derived from the config and the data size.

    ``micro_batch_size`` is what one device processes per forward/backward;
    ``batch_size = micro_batch_size * world_size * accumulation_steps``.
    """

    world_size: int
    micro_batch_size: int
    steps_per_epoch: int
    total_steps: int
    base_lr: float
    scaling: str
    lr: float
    schedule: WarmupThenDecay
    eval_every: int
    eval_batch_size: int
    target: Target | None


def _optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return get_spec(name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None


def _check_task_name(name: str) -> None:
    from largebatch.tasks import get_spec as get_task_spec

    if ":" not in name:
        try:
            get_task_spec(name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None


def _check_writable(out_dir: str) -> None:
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"Output directory {out_dir!r} is not writable: {error}") from None


def validate(config: RunConfig) -> None:
    """Raise ``ValueError`` naming the first bad value in ``config``.

    Checks everything that does not need the data: names, positive sizes,
    divisibility of the batch, one budget, a writable and unused output directory.
    Creates ``config.out_dir`` if needed.
    """
    _check_task_name(config.task)
    spec = _optimizer_spec(config.optimizer)
    if "lr" in config.optimizer_options:
        raise ValueError("Set the learning rate with lr (--lr), not as an optimizer option")
    for name in (
        "batch_size",
        "base_batch_size",
        "accumulation_steps",
        "nproc",
        "noise_scale_every",
    ):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
    devices_times_steps = config.nproc * config.accumulation_steps
    if config.batch_size % devices_times_steps:
        raise ValueError(
            f"Invalid batch_size: {config.batch_size} is not divisible by "
            f"nproc x accumulation_steps = {config.nproc} x {config.accumulation_steps}"
        )
    budgets = {k: getattr(config, k) for k in ("epochs", "steps", "examples")}
    given = {k: v for k, v in budgets.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"Set exactly one of epochs, steps, examples (got {given or 'none'})")
    for name, value in given.items():
        if value <= 0:
            raise ValueError(f"Invalid {name}: {value} (must be > 0)")
    if config.lr is not None and not config.lr > 0:
        raise ValueError(f"Invalid learning rate: {config.lr} (must be > 0)")
    if config.lr is None and _default_lr(spec, config.optimizer_options) is None:
        raise ValueError(f"Optimizer {config.optimizer!r} has no default learning rate; set lr")
    if config.scaling is not None and config.scaling not in SCALING_RULES:
        raise ValueError(f"Invalid scaling: {config.scaling!r} (choose from {SCALING_RULES})")
    if config.schedule not in DECAYS:
        raise ValueError(f"Invalid schedule: {config.schedule!r} (choose from {DECAYS})")
    if config.warmup_steps is not None and config.warmup_epochs is not None:
        raise ValueError("Set at most one of warmup_steps and warmup_epochs")
    for name in ("warmup_steps", "warmup_epochs"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
    for name in ("eval_every", "eval_batch_size", "checkpoint_every"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
    if config.noise_scale not in (None, True, False):
        raise ValueError(f"Invalid noise_scale: {config.noise_scale!r} (None, True or False)")
    if config.noise_scale and config.nproc == 1 and config.accumulation_steps == 1:
        raise ValueError(
            "noise_scale=True needs two gradients of different batch sizes per step: "
            "set nproc >= 2 or accumulation_steps >= 2"
        )
    if config.target is not None and len(config.target) != 2:
        raise ValueError(f"Invalid target: {config.target!r} (expected (metric, value))")
    check_device(config.device)
    # decay settings are checked by the schedule itself
    WarmupThenDecay(
        1, 0, config.schedule, config.decay_power, config.decay_milestones, config.decay_gamma
    )
    _check_writable(config.out_dir)
    if not config.resume:
        used = [name for name in RUN_FILES if (Path(config.out_dir) / name).exists()]
        if used:
            raise ValueError(
                f"Output directory {config.out_dir!r} already holds a run ({', '.join(used)}); "
                "resume it or choose another directory"
            )


def _default_lr(spec: OptimizerSpec, options: dict) -> float | None:
    """The registry's learning rate (a wrapper's comes from its base optimizer)."""
    if "lr" in spec.defaults:
        return spec.defaults["lr"]
    if spec.wraps is not None:
        return _default_lr(_optimizer_spec(options.get("base", spec.wraps)), {})
    return None


def plan_run(config: RunConfig, task: Task, world_size: int | None = None) -> RunPlan:
    """Resolve ``config`` against ``task`` (its training-set size and metrics).

    ``world_size`` is the number of processes actually running (default
    ``config.nproc``). Raises ``ValueError`` if the batch does not fit in the
    data or the warm-up is not shorter than the run.
    """
    world_size = config.nproc if world_size is None else world_size
    if world_size != config.nproc:
        raise ValueError(
            f"nproc={config.nproc} but {world_size} process(es) are running; launch with "
            f"`largebatch run --nproc {config.nproc}` or torchrun --nproc-per-node {config.nproc}"
        )
    num_train = len(task.train)
    if config.batch_size > num_train:
        raise ValueError(
            f"Invalid batch_size: {config.batch_size} is larger than the training set "
            f"({num_train} examples)"
        )
    spec = _optimizer_spec(config.optimizer)
    micro_batch_size = config.batch_size // (world_size * config.accumulation_steps)
    steps_per_epoch = num_train // config.batch_size

    if config.steps is not None:
        total_steps = config.steps
    elif config.examples is not None:
        total_steps = math.ceil(config.examples / config.batch_size)
    else:
        total_steps = max(1, round(config.epochs * steps_per_epoch))

    if config.warmup_steps is not None:
        warmup_steps = config.warmup_steps
    elif config.warmup_epochs is not None:
        warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    else:
        warmup_steps = round(spec.warmup * total_steps)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"Invalid warm-up: {warmup_steps} steps is not shorter than the run "
            f"({total_steps} steps)"
        )

    base_lr = config.lr if config.lr is not None else _default_lr(spec, config.optimizer_options)
    scaling = config.scaling if config.scaling is not None else spec.scaling_rule
    schedule = WarmupThenDecay(
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay=config.schedule,
        power=config.decay_power,
        milestones=tuple(config.decay_milestones),
        gamma=config.decay_gamma,
    )
    return RunPlan(
        world_size=world_size,
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
    )
