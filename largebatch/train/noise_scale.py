"""The gradient noise scale B_simple, logged during training at no extra backward pass.

``B_simple = tr(Sigma) / |G|^2`` needs the squared norms of two gradients of
different batch sizes (McCandlish et al. 2018; the estimator and its moving
averages are :mod:`largebatch.diagnostics.noise_scale`). A training step
already has two for free:

* **data parallel**: each process's own gradient (its share of the batch) and
  the all-reduced one (the global batch), read inside DDP's all-reduce by a
  communication hook (:class:`~largebatch.diagnostics.noise_scale.GradientNormRecorder`);
* **one process with gradient accumulation** over k >= 2 micro-batches: the
  first micro-batch's gradient (times k) and the accumulated one (the global
  batch), read by ``forward_backward`` (``step.py``).

One process without accumulation has a single gradient per step, so nothing is
measured; ``accumulation_steps=2`` makes it measurable (the same gradient up to
rounding, computed in two half-size passes). Measuring only reads gradients:
the parameters are bitwise those of a run without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from largebatch.diagnostics.noise_scale import (
    GradientNormRecorder,
    NoiseScaleTracker,
    two_batch_estimates,
)
from largebatch.optim import StepProtocol
from largebatch.train.config import RunConfig
from largebatch.utils.errors import ConfigError

if TYPE_CHECKING:  # plan.py imports this module
    from largebatch.train.plan import RunPlan

Source = Literal["data_parallel", "accumulation"]
#: moving-average factor per measurement: the logged B_simple averages about the last
#: 100 measurements (single ones are very noisy, more so when the two batches differ by 2x)
DECAY = 0.99
COLUMNS = ["noise_scale", "noise_scale_ema"]


def noise_scale_source(config: RunConfig, protocol: StepProtocol) -> Source | None:
    """Where a run gets its two gradients from, or ``None`` if it does not measure.

    ``config.noise_scale``: ``None`` measures when it is free, ``False`` never,
    ``True`` always (``ConfigError`` if it cannot be done for free). AdaScale
    (``scaling="adascale"``) needs the measurement, as ``True`` does. Never with
    batch growth, whose batch sizes change (RunConfig refuses ``True`` there).
    """
    source = None
    # under DDP the norms are read inside its all-reduce: the step must backward through it
    through_ddp = protocol.gradient_before_step or (
        protocol.closure is not None and getattr(protocol, "closure_backward", True)
    )
    if protocol.local_gradients:  # decentralized: no process sees the global-batch gradient
        if config.noise_scale:
            raise ConfigError(
                "noise_scale=True: a decentralized optimizer keeps each process's gradient "
                "local, so no global-batch gradient exists to measure it with"
            )
    elif config.noise_scale is not False and config.batch_growth is None:
        if config.nproc > 1 and through_ddp:
            source = "data_parallel"
        elif config.accumulation_steps > 1 and protocol.gradient_before_step:
            source = "accumulation"
    if (config.noise_scale or config.scaling == "adascale") and source is None:
        # RunConfig has checked nproc and accumulation
        setting = "scaling='adascale'" if config.scaling == "adascale" else "noise_scale=True"
        raise ConfigError(
            f"{setting}: in one process the gradient variance comes from the accumulated "
            "gradient, but this optimizer computes none before its step (closures only); "
            "under DDP it comes from the all-reduce, which this optimizer's gradients skip"
        )
    return source


class NoiseScaleMonitor:
    """Feeds a :class:`NoiseScaleTracker` from the loop's gradients every ``every`` steps.

    Per step the loop calls :meth:`begin_step` before the backward passes (it returns
    a list that ``forward_backward`` fills, accumulation only) and :meth:`update`
    after the optimizer step; at each evaluation
    :meth:`row` gives the ``metrics.csv`` values. A monitor whose ``source`` is
    ``None`` does nothing, so the loop has a single code path.

    Args:
        source: see :func:`noise_scale_source`.
        model: the model the loop trains (the DDP wrapper for ``"data_parallel"``).
        small_batch, big_batch: batch sizes of the two gradients.
        every: measure on steps ``0, every, 2 every, ...``.
        decay: moving-average factor per measurement (bias-corrected, so early on the
            average is that of every measurement so far).
        device: where the gradients live (the sums stay there: no host sync per step).
    """

    def __init__(
        self,
        source: Source | None,
        model: nn.Module,
        small_batch: int,
        big_batch: int,
        every: int,
        decay: float = DECAY,
        device: torch.device | str = "cpu",
    ) -> None:
        self.source = source
        self.small_batch = small_batch
        self.big_batch = big_batch
        self.every = every
        self.tracker = NoiseScaleTracker(decay)
        self._recorder = GradientNormRecorder(model) if source == "data_parallel" else None
        # since the last row: sums of the small and big squared norms, and their count
        self._interval = torch.zeros(3, dtype=torch.float64, device=device)

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        plan: RunPlan,
        protocol: StepProtocol,
        model: nn.Module,
        device: torch.device,
    ) -> NoiseScaleMonitor:
        """The monitor of a run (one that does nothing if the run cannot measure for free)."""
        source = noise_scale_source(config, protocol)
        if source == "data_parallel":  # this process's batch vs the global batch
            small = plan.micro_batch_size * plan.accumulation_steps
        else:  # one micro-batch vs the whole batch
            small = plan.micro_batch_size
        every = 1 if config.scaling == "adascale" else config.noise_scale_every  # a gain per step
        return cls(source, model, small, plan.batch_size, every, device=device)

    @property
    def columns(self) -> list[str]:
        """The ``metrics.csv`` columns this monitor fills."""
        return COLUMNS if self.source is not None else []

    def _due(self, step: int) -> bool:
        return self.source is not None and step % self.every == 0

    def begin_step(self, step: int) -> list[torch.Tensor] | None:
        """Prepare step ``step`` (call before its backward passes).

        Under DDP, the gradient hook records norms on measured steps only. Returns an
        empty list for ``forward_backward`` to fill on measured accumulation steps.
        """
        if self._recorder is not None:
            self._recorder.recording = self._due(step)
        return [] if self.source == "accumulation" and self._due(step) else None

    def update(self, step: int, sqnorms: list[torch.Tensor] | None) -> None:
        """Fold in step ``step``'s two squared norms (call after every optimizer step)."""
        if not self._due(step):
            return
        if self._recorder is not None:
            small, big = self._recorder.read()  # a collective: every process gets here
        else:
            small, big = sqnorms
        self.tracker.update(small, self.small_batch, big, self.big_batch)
        self._interval += torch.stack([small, big, torch.ones_like(small)])

    def row(self) -> dict[str, float | str]:
        """``noise_scale`` since the previous row and the moving average ``noise_scale_ema``.

        ``noise_scale`` is the ratio of the interval's mean ``tr(Sigma)`` and mean
        ``|G|^2`` estimates (NaN if the latter is not positive); empty before any
        measurement. Starts a new interval.
        """
        if self.source is None:
            return {}
        small, big, count = self._interval.tolist()
        row: dict[str, float | str] = {"noise_scale": "", "noise_scale_ema": ""}
        if count:
            grad_sqnorm, trace = two_batch_estimates(
                small / count, self.small_batch, big / count, self.big_batch
            )
            row["noise_scale"] = (trace / grad_sqnorm).item() if grad_sqnorm > 0 else float("nan")
        if self.tracker.num_updates:
            row["noise_scale_ema"] = self.tracker.estimate().b_simple
        self._interval.zero_()
        return row

    def result(self) -> dict[str, float]:
        """The final moving averages for ``RunResult.extra`` (empty if never measured)."""
        if self.source is None or not self.tracker.num_updates:
            return {}
        estimate = self.tracker.estimate()
        return {
            "noise_scale": estimate.b_simple,
            "noise_scale_grad_sqnorm": estimate.grad_sqnorm,
            "noise_scale_trace_covariance": estimate.trace_covariance,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "interval": self._interval.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self._interval = state["interval"].to(self._interval.device, copy=True)
