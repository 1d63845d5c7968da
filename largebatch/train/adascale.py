"""AdaScale: the learning rate scaled per step by the measured gain of a larger batch.

Johnson, Agrawal, Gu & Guestrin, "AdaScale SGD: A User-Friendly Algorithm for
Distributed Training" (ICML 2020, arXiv 2007.05105). A base schedule ``lr(t)`` is
tuned at batch ``B0``; at batch ``B = S B0`` each step's rate is ``r lr(tau)``
with the *gain ratio*

    r = (sigma^2 + |G|^2) / (sigma^2 / S + |G|^2),    sigma^2 = tr(Sigma) / B0,

the expected progress of one batch-B step relative to one batch-B0 step, from
``tr(Sigma)`` (the per-example gradient covariance) and ``|G|^2`` (the true
gradient). ``r`` lies in [1, S]: close to S when the gradient is mostly noise
(linear scaling is right), close to 1 when it is mostly signal (a larger batch
buys nothing). Below the base batch (S < 1) the same formula scales the rate
down, ``r`` in [S, 1]. ``tau``, the *scale-invariant iterations*, counts progress in
base-batch steps, ``tau += r`` per step, and drives the base schedule; the run
ends when ``tau`` reaches the base schedule's length.

The two statistics are those the noise-scale logging already gathers
(:mod:`largebatch.train.noise_scale`: the two-batch estimates of McCandlish et
al. from the per-rank or per-micro-batch gradient norms, averaged by
:class:`~largebatch.diagnostics.noise_scale.NoiseScaleTracker`). In terms of the
noise scale ``B_simple = tr(Sigma) / |G|^2``:
``r = (B_simple / B0 + 1) / (B_simple / B + 1)``.

As in any scheduler stepped after the optimizer, the gain of step ``t`` comes
from the statistics up to step ``t - 1`` (the averages span about a hundred
steps, so this lag does not matter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from largebatch.diagnostics.noise_scale import NoiseScaleTracker
from largebatch.train.schedules import RunScheduler, WarmupThenDecay


def adascale_gain(
    trace_covariance: float, grad_sqnorm: float, base_batch: int, batch: int
) -> float:
    """The gain ratio of batch ``batch`` over ``base_batch`` (1 when nothing is known).

    Negative estimates (possible early on: both are differences of noisy norms)
    count as 0, and the result is kept between 1 and S (where the exact ratio lies).
    """
    scale = batch / base_batch
    trace = max(trace_covariance, 0.0) if math.isfinite(trace_covariance) else 0.0
    signal = max(grad_sqnorm, 0.0) if math.isfinite(grad_sqnorm) else 0.0
    denominator = trace / batch + signal
    if denominator <= 0:
        return 1.0
    low, high = min(1.0, scale), max(1.0, scale)
    return min(max((trace / base_batch + signal) / denominator, low), high)


@dataclass(frozen=True)
class AdaScaleSchedule:
    """An AdaScale run: the ``base`` schedule in base-batch steps, and the two batch sizes.

    ``base.total_steps`` is the run's length in scale-invariant iterations,
    ``S`` times the steps a linearly scaled run would take.
    """

    base: WarmupThenDecay
    base_batch_size: int
    batch_size: int

    @property
    def scale(self) -> float:
        return self.batch_size / self.base_batch_size

    @property
    def most_steps(self) -> int:
        """The longest the run can take: every gain at its bound nearest 1."""
        return max(self.base.total_steps, math.ceil(self.base.total_steps / self.scale))

    @property
    def warmup_steps(self) -> int:
        """The base schedule's warm-up, in scale-invariant iterations."""
        return self.base.warmup_steps


class AdaScale(RunScheduler, LRScheduler):
    """Rate ``gain * base_lr * base(tau)`` per parameter group; ``tau`` advances by the gain.

    Args:
        optimizer: the optimizer, built with the base (unscaled) learning rate.
        schedule: the base schedule and the two batch sizes.
        tracker: the moving averages of ``|G|^2`` and ``tr(Sigma)`` (the noise-scale
            monitor's), updated by the loop before each :meth:`step`; ``None``, or a
            tracker never updated, gives a gain of 1: the base schedule itself.
    """

    columns = ("adascale_gain", "scale_invariant_steps")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: AdaScaleSchedule,
        tracker: NoiseScaleTracker | None = None,
    ) -> None:
        self.schedule = schedule
        self.tracker = tracker
        self.gain = 1.0
        self.progress = 0.0  # tau, in base-batch steps
        super().__init__(optimizer)

    def step(self, loss: torch.Tensor | None = None) -> None:
        """Count the step just taken at its gain; measure the gain of the next one."""
        if not self._is_initial:
            self.progress += self.gain
            self.gain = self.measured_gain()
        super().step()

    def measured_gain(self) -> float:
        """The gain from the tracker's current averages (synchronises with the device)."""
        if self.tracker is None or not self.tracker.num_updates:
            return 1.0
        estimate = self.tracker.estimate()
        return adascale_gain(
            estimate.trace_covariance,
            estimate.grad_sqnorm,
            self.schedule.base_batch_size,
            self.schedule.batch_size,
        )

    def get_lr(self) -> list[float]:
        factor = self.gain * self.schedule.base(self.progress)  # exact base(t) when the gain is 1
        return [base_lr * factor for base_lr in self.base_lrs]

    @property
    def finished(self) -> bool:
        return self.progress >= self.schedule.base.total_steps

    def row(self) -> dict[str, float | str]:
        return {"adascale_gain": self.gain, "scale_invariant_steps": self.progress}

    def summary(self) -> dict[str, Any]:
        return {
            "adascale_gain": self.gain,
            "adascale_scale": self.schedule.scale,
            "scale_invariant_steps": self.progress,
        }

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in ("schedule", "tracker")}
