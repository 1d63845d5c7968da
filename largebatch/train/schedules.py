"""Learning-rate scaling with batch size, and warm-up-then-decay schedules.

Every length here is counted in global optimizer steps (one step = one update
from a whole global batch), so the number of devices and of accumulation
micro-steps cannot change a schedule.

The loop drives every schedule through one interface, :class:`RunScheduler`:
``step(loss)`` once per optimizer step with that step's training loss (averaged
over processes), ``finished`` when the schedule has used up the run, and
``columns``/``row()``/``summary()`` for what it logs. The fixed schedules here
ignore the loss; AutoWU (:mod:`.autowu`) and AdaScale (:mod:`.adascale`) use it
or the gradient statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from largebatch.utils.errors import ConfigError
from largebatch.utils.values import is_number

SCALING_RULES = ("none", "linear", "sqrt")
DECAYS = ("constant", "cosine", "poly", "step")
#: ``RunConfig.scaling``: the fixed rules, or AdaScale's gain measured per step
SCALINGS = (*SCALING_RULES, "adascale")
#: ``RunConfig.schedule``: warm-up then one of the fixed decays, or AutoWU
SCHEDULES = (*DECAYS, "autowu")


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """The learning rate for ``batch_size`` given one tuned at ``base_batch_size``.

    ``linear`` multiplies by ``batch_size / base_batch_size`` (Goyal et al. 2017),
    ``sqrt`` by its square root (Krizhevsky 2014; the usual rule for Adam-type
    methods), ``none`` keeps ``base_lr``, and so does ``adascale``, whose
    measured gain scales it step by step (:mod:`.adascale`).
    """
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule in ("none", "adascale"):
        return base_lr
    raise ConfigError(f"Invalid scaling rule: {rule!r} (choose from {', '.join(SCALINGS)})")


def check_decay(
    decay: str,
    power: float,
    milestones: tuple[float, ...],
    gamma: float,
    warmup_start: float = 0.0,
    floor: float = 0.0,
) -> None:
    """``ConfigError`` naming the first invalid decay setting (see :class:`WarmupThenDecay`)."""
    if not is_number(warmup_start) or not 0 <= warmup_start < 1:
        raise ConfigError(f"Invalid warmup_start: {warmup_start!r} (must be in [0, 1))")
    if not is_number(floor) or not 0 <= floor < 1:
        raise ConfigError(f"Invalid decay_floor: {floor!r} (must be in [0, 1))")
    if decay not in DECAYS:
        raise ConfigError(f"Invalid decay: {decay!r} (choose from {', '.join(DECAYS)})")
    if not is_number(power) or power <= 0:
        raise ConfigError(f"Invalid decay power: {power!r} (must be > 0)")
    if not is_number(gamma) or not 0 < gamma <= 1:
        raise ConfigError(f"Invalid decay gamma: {gamma!r} (must be in (0, 1])")
    if not isinstance(milestones, tuple | list) or any(
        not is_number(m) or not 0 < m < 1 for m in milestones
    ):
        raise ConfigError(f"Invalid decay milestones: {milestones} (fractions in (0, 1))")


@dataclass
class WarmupThenDecay:
    """Multiplier of the peak learning rate at a given (0-based) optimizer step.

    Warm-up rises linearly from ``warmup_start``,
    ``s0 + (1 - s0) (step + 1) / warmup_steps``, so the first update already
    moves and step ``warmup_steps - 1`` runs at the peak (``s0 = 0`` by default;
    Goyal et al. start from the small-batch rate, i.e. ``s0`` = 1 / scaling factor).
    Decay then goes over the remaining steps with progress ``p`` from 0 to 1,
    from 1 down to ``floor``: ``floor + (1 - floor) d(p)`` with ``d`` the
    ``cosine`` 0.5 (1 + cos(pi p)); ``poly`` (1 - p) ** power (You et al.'s
    LAMB schedule); ``step`` gamma ** (milestones passed), milestones being
    fractions of the whole run; ``constant`` 1.

    ``step`` may be fractional (AdaScale reads the schedule at its
    scale-invariant progress). A plain object (not a closure) so
    ``LambdaLR.state_dict`` saves its settings.
    """

    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"
    power: float = 1.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_start: float = 0.0
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"Invalid total_steps: {self.total_steps} (must be >= 1)")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"Invalid warmup_steps: {self.warmup_steps} (must be in [0, {self.total_steps}])"
            )
        check_decay(
            self.decay, self.power, self.milestones, self.gamma, self.warmup_start, self.floor
        )

    def __call__(self, step: float) -> float:
        if step < self.warmup_steps:  # (exact at warmup_start = 0: 0 + 1 * x is x)
            return self.warmup_start + (1 - self.warmup_start) * (step + 1) / self.warmup_steps
        return self.floor + (1 - self.floor) * self._decay(step)

    def _decay(self, step: float) -> float:
        decay_steps = self.total_steps - self.warmup_steps
        progress = min((step - self.warmup_steps) / decay_steps, 1.0) if decay_steps else 1.0
        if self.decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "poly":
            return (1.0 - progress) ** self.power
        if self.decay == "step":
            passed = sum(step >= round(m * self.total_steps) for m in self.milestones)
            return self.gamma**passed
        return 1.0


class RunScheduler:
    """What the loop asks of a learning-rate scheduler besides ``torch``'s ``LRScheduler`` API.

    Mixed into an ``LRScheduler`` subclass. The defaults suit a schedule fixed in
    advance: it ignores the loss, ends with the run's step budget and logs nothing.
    """

    #: ``metrics.csv`` columns this scheduler fills in :meth:`row`
    columns: tuple[str, ...] = ()

    def step(self, loss: torch.Tensor | None = None) -> None:
        super().step()  # type: ignore[misc]

    @property
    def finished(self) -> bool:
        """Whether the schedule has used up the run (the loop stops then, at the latest)."""
        return False

    def row(self) -> dict[str, float | str]:
        """Values of :attr:`columns` for the ``metrics.csv`` row being written."""
        return {}

    def summary(self) -> dict[str, object]:
        """What goes into ``RunResult.extra`` at the end of the run."""
        return {}


class FixedSchedule(RunScheduler, LambdaLR):
    """A ``LambdaLR`` applying a :class:`WarmupThenDecay` to every parameter group."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: WarmupThenDecay) -> None:
        super().__init__(optimizer, lr_lambda=schedule)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupThenDecay) -> FixedSchedule:
    """The scheduler applying ``schedule`` to every parameter group; step it once per update."""
    return FixedSchedule(optimizer, schedule)
