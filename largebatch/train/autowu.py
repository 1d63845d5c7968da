"""AutoWU: a warm-up that ends where the training loss stops falling (Kim et al. 2021).

Kim, Kim, Kim, Lee & Kim, "Automated Learning Rate Scheduler for Large-batch
Training" (ICML 2021 AutoML workshop, arXiv 2107.05855; official code
``kakaobrain/autowu``). Two phases:

1. **Warm-up**: the rate rises exponentially from ``min_lr``, by the factor
   ``(max_lr / min_lr) ** (1 / W)`` per step, ``W`` being the cap on the
   warm-up (``max_warmup`` of the run). Every step's training loss is kept.
   At the end of every epoch a Gaussian process is fitted to all the losses so
   far and asked whether the loss has passed its minimum (:func:`minimum_test`).
   After ``patience`` positive tests in a row the warm-up ends; the peak rate is
   the ramp's rate at the minimum of the smoothed loss, not the overshooting
   current one. At step ``W`` it ends in any case, at ``max_lr``.
2. **Decay** to zero over what is left of the run: ``cosine`` from the switch,
   or ``constant-cosine`` (the peak held, then a cosine over the last
   ``cooldown_fraction`` of the run; the warm-up then also ends when that
   cool-down begins).

The Gaussian process is scikit-learn's ``GaussianProcessRegressor`` with the
paper's model: a constant mean (the data mean), a scaled RBF kernel whose
length scale is fixed at 0.2 (the x-axis is the fraction of the warm-up so far)
and Gaussian noise starting at 1e-3. The official code fits the scale and the
noise by 100 Adam steps (which leave them near their start); here they are
fitted by scikit-learn's maximum-likelihood optimiser, so the noise level is
estimated from the losses.

Under data parallelism every process keeps the same (all-reduced) losses, the
test runs on rank 0 alone and its outcome is broadcast, so all processes switch
at the same step. The whole state (losses, test outcomes, phase, switch step and
peak) is in :meth:`AutoWU.state_dict`, and each test draws its random subsamples
from a generator seeded by the run's seed and the test's index, so a resumed run
switches exactly where the uninterrupted one does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from largebatch.train import distributed
from largebatch.train.distributed import Distributed
from largebatch.train.schedules import RunScheduler
from largebatch.utils.errors import ConfigError
from largebatch.utils.values import is_number

#: the decays after the warm-up: "cosine" from the switch, or held then a final cosine
AUTOWU_DECAYS = ("cosine", "constant-cosine")
#: added to the variance of a difference of two posterior values (as the official code)
DIFFERENCE_JITTER = 1e-4


def check_autowu(min_lr: Any, max_lr: Any, max_warmup: Any, decay: Any) -> None:
    """``ConfigError`` naming the first invalid AutoWU setting."""
    for name, value in (("autowu_min_lr", min_lr), ("autowu_max_lr", max_lr)):
        if not is_number(value) or not 0 < value < math.inf:
            raise ConfigError(f"Invalid {name}: {value!r} (must be a number > 0)")
    if min_lr >= max_lr:
        raise ConfigError(
            f"Invalid autowu_min_lr: {min_lr!r} is not below autowu_max_lr={max_lr!r} "
            "(the warm-up rises from the minimum to the maximum)"
        )
    if not is_number(max_warmup) or not 0 < max_warmup <= 1:
        raise ConfigError(
            f"Invalid autowu_max_warmup: {max_warmup!r} (the cap on the warm-up, as a "
            "fraction of the run, must be in (0, 1])"
        )
    if decay not in AUTOWU_DECAYS:
        raise ConfigError(
            f"Invalid autowu_decay: {decay!r} (choose from {', '.join(AUTOWU_DECAYS)})"
        )


@dataclass(frozen=True)
class AutoWUSchedule:
    """The numbers an AutoWU run follows; the defaults of the test are the paper's.

    ``warmup_steps`` is the cap ``W`` on the warm-up (``floor(max_warmup * total_steps)``).
    """

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    min_lr: float = 1e-5
    max_lr: float = 1.0
    decay: str = "cosine"
    cooldown_fraction: float = 0.2
    patience: int = 3
    confidence: float = 0.95
    predictions: int = 5
    lengthscale: float = 0.2
    fit_points: int = 100
    predict_points: int = 500
    grid_points: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(
                f"Invalid AutoWU warm-up cap: {self.warmup_steps} steps (must be in "
                f"[1, {self.total_steps}], the run's length)"
            )
        check_autowu(self.min_lr, self.max_lr, self.warmup_steps / self.total_steps, self.decay)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"Invalid steps_per_epoch: {self.steps_per_epoch} (must be >= 1)")
        if not 0 < self.cooldown_fraction <= 1:
            raise ConfigError(
                f"Invalid cooldown_fraction: {self.cooldown_fraction!r} (must be in (0, 1])"
            )
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"Invalid confidence: {self.confidence!r} (must be in [0.5, 1))")
        for name in ("patience", "predictions", "fit_points", "predict_points", "grid_points"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")

    @property
    def cooldown_start(self) -> int:
        """First step of the final cosine of ``constant-cosine``."""
        return math.ceil((1 - self.cooldown_fraction) * self.total_steps)

    @property
    def warmup_end(self) -> int:
        """The step at which the warm-up ends if the test has not ended it before."""
        if self.decay == "constant-cosine":
            return min(self.warmup_steps, self.cooldown_start)
        return self.warmup_steps

    def ramp(self, step: float) -> float:
        """The warm-up's rate at ``step``: ``min_lr (max_lr / min_lr) ** (step / W)``."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / self.warmup_steps)

    def decayed(self, step: int, switch_step: int, peak: float) -> float:
        """The rate at ``step`` after a switch at ``switch_step`` with peak ``peak``."""
        start = switch_step
        if self.decay == "constant-cosine":
            start = max(switch_step, self.cooldown_start)
            if step < start:
                return peak
        length = self.total_steps - start
        progress = min((step - start) / length, 1.0) if length > 0 else 1.0
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class MinimumTest:
    """One epoch's test: has the loss passed its minimum?

    ``probabilities[j]`` is, for posterior prediction ``j``, the largest
    probability that the smoothed loss at an earlier point is below the current
    one; the test is ``positive`` when more than half exceed the confidence.
    ``minima[j]`` is where prediction ``j``'s mean is lowest, as a fraction of
    the losses so far (0: the first, 1: now). ``signal_variance`` and
    ``noise_variance`` are the fitted kernel scale and noise level.
    """

    positive: bool
    probabilities: tuple[float, ...]
    minima: tuple[float, ...]
    signal_variance: float = math.nan
    noise_variance: float = math.nan


def minimum_test(
    losses: np.ndarray, schedule: AutoWUSchedule, rng: np.random.Generator
) -> MinimumTest:
    """Fit a Gaussian process to ``losses`` (one per step, NaN/inf ignored) and test them.

    The kernel's scale and the noise are fitted on at most ``fit_points`` losses;
    then each of ``predictions`` posteriors of the noise-free curve, conditioned on
    its own random subsample of at most ``predict_points`` losses, is evaluated on
    ``grid_points`` points of [0, 1]. For each, the probability that the curve at
    some earlier grid point lies below its value at the end uses the Gaussian
    marginal of the difference (variance from the posterior covariance, plus
    :data:`DIFFERENCE_JITTER`).
    """
    from threadpoolctl import threadpool_limits

    # a few hundred points: one BLAS thread is fastest, and leaves the others to training
    with threadpool_limits(limits=1):
        return _minimum_test(np.asarray(losses, dtype=np.float64), schedule, rng)


def _minimum_test(
    losses: np.ndarray, schedule: AutoWUSchedule, rng: np.random.Generator
) -> MinimumTest:
    from scipy.special import ndtr
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    valid = np.flatnonzero(np.isfinite(losses))
    if valid.size < 3:
        return MinimumTest(False, (), ())
    x = np.arange(losses.size, dtype=np.float64) / losses.size
    mean = losses[valid].mean()

    def subsample(size: int) -> np.ndarray:
        if valid.size <= size:
            return valid
        return np.sort(rng.choice(valid, size=size, replace=False))

    signal = ConstantKernel(1.0, (1e-8, 1e8)) * RBF(schedule.lengthscale, "fixed")
    kernel = signal + WhiteKernel(1e-3, (1e-10, 1e4))
    chosen = subsample(schedule.fit_points)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a scale at its bound is fine
        fitted = GaussianProcessRegressor(kernel).fit(x[chosen, None], losses[chosen] - mean)
    fitted_signal, noise = fitted.kernel_.k1, fitted.kernel_.k2.noise_level

    grid = np.linspace(0.0, 1.0, schedule.grid_points)[:, None]
    probabilities, minima = [], []
    for _ in range(schedule.predictions):
        chosen = subsample(schedule.predict_points)
        # alpha: the fitted noise on the data only, so the prediction is of the curve itself
        gp = GaussianProcessRegressor(fitted_signal, alpha=noise, optimizer=None)
        gp.fit(x[chosen, None], losses[chosen] - mean)
        curve, covariance = gp.predict(grid, return_cov=True)
        variance = np.diag(covariance)
        difference_var = variance[:-1] + variance[-1] - 2 * covariance[:-1, -1]
        scale = np.sqrt(np.maximum(difference_var, 0.0) + DIFFERENCE_JITTER)
        probabilities.append(float(ndtr((curve[-1] - curve[:-1]) / scale).max()))
        minima.append(float(grid[np.argmin(curve), 0]))
    votes = sum(p > schedule.confidence for p in probabilities)
    return MinimumTest(
        votes > schedule.predictions / 2,
        tuple(probabilities),
        tuple(minima),
        float(fitted_signal.k1.constant_value),
        float(noise),
    )


class AutoWU(RunScheduler, LRScheduler):
    """The AutoWU learning-rate scheduler; call :meth:`step` with each step's training loss.

    Rates are absolute (``schedule.min_lr`` ... ``schedule.max_lr``); parameter
    groups whose initial rates differ keep their ratio to the first group's.

    Args:
        optimizer: the optimizer whose rates are set.
        schedule: the run's numbers and the test's settings.
        ddp: under data parallelism, where this process stands: rank 0 tests and
            broadcasts the outcome. Each process passes its own loss; they are
            averaged over processes once per epoch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: AutoWUSchedule,
        ddp: Distributed | None = None,
    ) -> None:
        self.schedule = schedule
        self.ddp = ddp
        self.phase = "warmup"
        self.switch_step: int | None = None
        self.peak_lr: float | None = None
        self.switch_reason: str | None = None
        self.losses: list[float] = []
        self.pending: list[torch.Tensor] = []
        self.tests: list[bool] = []
        self.probabilities: list[list[float]] = []
        super().__init__(optimizer)

    def step(self, loss: torch.Tensor | None = None) -> None:
        """Record the loss of the step just taken and set the rate of the next one."""
        done = self.last_epoch + 1  # optimizer steps taken so far
        if loss is not None and self.phase == "warmup":
            if done >= self.schedule.warmup_end:  # the cap (or the cool-down) is reached
                at_cap = done >= self.schedule.warmup_steps
                self._switch(
                    done, self.schedule.max_lr if at_cap else self.schedule.ramp(done), "cap"
                )
            else:
                self.pending.append(loss.detach().reshape(()).clone())
                if done % self.schedule.steps_per_epoch == 0:
                    self._end_epoch(done)
        super().step()

    def _flush(self) -> None:
        """Average the losses held as tensors over processes and move them into :attr:`losses`.

        One collective and one host sync per epoch.
        """
        if self.pending:
            device = self.pending[-1].device  # restored ones are on the CPU: one transfer back
            values = torch.stack([t.to(device, torch.float64) for t in self.pending])
            if self.ddp is not None:  # one collective per epoch, not one per step
                distributed.all_reduce_mean(values, self.ddp)
            self.losses.extend(values.cpu().tolist())
            self.pending.clear()

    def _end_epoch(self, done: int) -> None:
        """Test the losses so far (on rank 0) and switch after ``patience`` positive tests."""
        self._flush()
        rng = np.random.default_rng([self.schedule.seed, len(self.tests)])
        test = self._on_rank_zero(minimum_test, np.array(self.losses), self.schedule, rng)
        self.tests.append(test.positive)
        self.probabilities.append(list(test.probabilities))
        patience = self.schedule.patience
        if len(self.tests) >= patience and all(self.tests[-patience:]):
            last = len(self.losses) - 1
            peak = float(np.mean([self.schedule.ramp(m * last) for m in test.minima]))
            self._switch(done, peak, "test")

    def _on_rank_zero(self, fn: Any, *args: Any) -> Any:
        if self.ddp is None:
            return fn(*args)
        return distributed.on_rank_zero(self.ddp, fn, *args)

    def _switch(self, done: int, peak: float, reason: str) -> None:
        self._flush()
        self.phase, self.switch_step, self.peak_lr, self.switch_reason = "decay", done, peak, reason

    def rate(self, step: int) -> float:
        """The (first group's) rate of ``step`` as things stand."""
        if self.phase == "warmup":
            return self.schedule.ramp(step)
        return self.schedule.decayed(step, self.switch_step, self.peak_lr)

    def get_lr(self) -> list[float]:
        rate = self.rate(self.last_epoch)
        return [rate * base / self.base_lrs[0] for base in self.base_lrs]

    @property
    def finished(self) -> bool:
        return self.last_epoch >= self.schedule.total_steps

    def summary(self) -> dict[str, Any]:
        return {
            "autowu_switch_step": self.switch_step,
            "autowu_peak_lr": self.peak_lr,
            "autowu_switch_reason": self.switch_reason,
            "autowu_tests": len(self.tests),
        }

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in super().state_dict().items() if k not in ("schedule", "ddp")}
        state["pending"] = torch.tensor([t.item() for t in self.pending], dtype=torch.float64)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        pending = state.pop("pending")
        super().load_state_dict(state)
        self.pending = list(pending.unbind()) if pending.numel() else []
