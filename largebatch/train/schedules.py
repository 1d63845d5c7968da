"""Learning-rate scaling with batch size, and warm-up-then-decay schedules.

Every length here is counted in global optimizer steps (one step = one update
from a whole global batch), so the number of devices and of accumulation
micro-steps cannot change a schedule.
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


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """The learning rate for ``batch_size`` given one tuned at ``base_batch_size``.

    ``linear`` multiplies by ``batch_size / base_batch_size`` (Goyal et al. 2017),
    ``sqrt`` by its square root (Krizhevsky 2014; the usual rule for Adam-type
    methods), ``none`` keeps ``base_lr``.
    """
    ratio = batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "none":
        return base_lr
    raise ConfigError(f"Invalid scaling rule: {rule!r} (choose from {', '.join(SCALING_RULES)})")


def check_decay(decay: str, power: float, milestones: tuple[float, ...], gamma: float) -> None:
    """``ConfigError`` naming the first invalid decay setting (see :class:`WarmupThenDecay`)."""
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

    Warm-up rises linearly, ``(step + 1) / warmup_steps``, so the first update
    already moves and step ``warmup_steps - 1`` runs at the peak. Decay then goes
    over the remaining steps with progress ``p`` from 0 to 1:
    ``cosine`` 0.5 (1 + cos(pi p)); ``poly`` (1 - p) ** power (You et al.'s
    LAMB schedule); ``step`` gamma ** (milestones passed), milestones being
    fractions of the whole run; ``constant`` 1.

    A plain object (not a closure) so ``LambdaLR.state_dict`` saves its settings.
    """

    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"
    power: float = 1.0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"Invalid total_steps: {self.total_steps} (must be >= 1)")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"Invalid warmup_steps: {self.warmup_steps} (must be in [0, {self.total_steps}])"
            )
        check_decay(self.decay, self.power, self.milestones, self.gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
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


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupThenDecay) -> LambdaLR:
    """A ``LambdaLR`` applying ``schedule`` to every parameter group; step it once per update."""
    return LambdaLR(optimizer, lr_lambda=schedule)
