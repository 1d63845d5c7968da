"""Iterate averaging: Polyak-Ruppert and exponential moving averages of the weights.

The averaged weights never feed back into training (Bottou, Curtis & Nocedal
2018, eq. 5.16); they are what one evaluates. Both kinds build on
``torch.optim.swa_utils.AveragedModel`` (a copy of the model whose parameters
hold the average):

* ``"polyak"``: the uniform mean of the iterates from step ``start`` on
  (Polyak & Juditsky 1992; Ruppert 1988). With steps ``a_k ~ k^-a``,
  ``a in (1/2, 1)``, on a strongly convex problem the mean reaches the optimal
  ``O(1/k)`` error while the last iterate has ``O(k^-a)``; with a constant step
  it removes most of the last iterate's stationary noise.
* ``"ema"``: ``avg = decay * avg + (1 - decay) * w`` from step ``start`` on
  (``torch.optim.swa_utils.get_ema_multi_avg_fn``).

Batch-norm running statistics are not averaged (``use_buffers=False``): after
averaging, :meth:`IterateAverage.recompute_batch_norm` recomputes them for the
averaged weights with one pass over training batches (``torch.optim.swa_utils.update_bn``);
under ``torch.distributed`` each rank passes its shard and the statistics are
then averaged across ranks. Models without batch norm need no pass.

Interface a training loop drives::

    average = IterateAverage(model, AveragingConfig("polyak", start=1000))
    for step in ...:
        optimizer.step(); ...
        average.update(model, step + 1)           # steps done so far
        if evaluating:
            average.recompute_batch_norm(train_batches)
            evaluate(average.module, ...)
    checkpoint["averaging"] = average.state_dict()

:class:`Averaging` is the training loop's side (``--averaging polyak|ema``): it
evaluates the averaged weights into ``avg_*`` columns of ``metrics.csv`` and is
checkpointed with the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import (
    AveragedModel,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
    update_bn,
)

from largebatch.diagnostics.evaluation import model_device, unwrap
from largebatch.utils.errors import ConfigError

KINDS = ("polyak", "ema")


@dataclass(frozen=True)
class AveragingConfig:
    """What to average and from when.

    Attributes:
        kind: ``"polyak"`` (uniform) or ``"ema"``.
        start: the number of steps after which averaging begins (the first
            averaged iterate is the one after step ``start``).
        decay: the EMA factor in [0, 1) (``"ema"`` only).
        every: average every ``every`` steps (>= 1).
    """

    kind: str = "polyak"
    start: int = 0
    decay: float = 0.999
    every: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Invalid averaging kind: {self.kind!r} (expected one of {KINDS})")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"Invalid averaging start: {self.start} (expected an integer >= 0)")
        if not (isinstance(self.decay, int | float) and 0 <= self.decay < 1):
            raise ConfigError(f"Invalid averaging decay: {self.decay} (expected 0 <= decay < 1)")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"Invalid averaging every: {self.every} (expected an integer >= 1)")


class IterateAverage:
    """An average of a model's weights along training (module docstring).

    Args:
        model: the model being trained (a DDP wrapper is unwrapped); it is copied.
        config: what to average.
    """

    def __init__(self, model: nn.Module, config: AveragingConfig) -> None:
        self.config = config
        ema = config.kind == "ema"
        self._fold = get_ema_multi_avg_fn(config.decay) if ema else get_swa_multi_avg_fn()
        self.averaged = AveragedModel(unwrap(model), multi_avg_fn=self._fold, use_buffers=False)
        self._count = 0  # ``averaged.n_averaged``, also on the host

    @property
    def module(self) -> nn.Module:
        """The model with the averaged weights, for evaluation."""
        return self.averaged.module

    @property
    def num_averaged(self) -> int:
        """Iterates folded into the average so far."""
        return self._count

    def update(self, model: nn.Module, steps_done: int) -> bool:
        """Fold in ``model``'s weights after ``steps_done`` optimizer steps, if due; True if folded."""
        offset = steps_done - self.config.start
        if offset < 1 or (offset - 1) % self.config.every:
            return False
        self._fold_in(unwrap(model))
        return True

    @torch.no_grad()
    def _fold_in(self, model: nn.Module) -> None:
        """``AveragedModel.update_parameters`` with the count of iterates kept on the host:
        torch's reads its counter tensor and copies it to the device, a wait per step on a
        GPU (``tests/train/test_host_syncs.py``)."""
        averaged = [p.detach() for p in self.averaged.module.parameters()]
        current = [p.detach().to(a.device) for a, p in zip(averaged, model.parameters())]
        if self._count == 0:
            torch._foreach_copy_(averaged, current)
        else:
            self._fold(averaged, current, self._count)
        for mine, theirs in zip(self.averaged.module.buffers(), model.buffers()):
            mine.copy_(theirs)  # not averaged (use_buffers=False): kept as the model's
        self._count += 1
        self.averaged.n_averaged += 1

    def recompute_batch_norm(self, batches: Iterable[Any]) -> None:
        """Batch-norm running statistics of the averaged weights, from ``batches`` (inputs or ``(inputs, targets)``)."""
        module = self.module
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        update_bn(batches, module, device=model_device(module))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for norm in norms:
                for buffer in (norm.running_mean, norm.running_var):
                    dist.all_reduce(buffer)
                    buffer /= dist.get_world_size()

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
        self._count = int(self.averaged.n_averaged)


Evaluate = Callable[[nn.Module], dict[str, dict[str, float]]]


class Averaging:
    """A run's iterate average: the loop's side of :class:`IterateAverage`.

    Without a config it does nothing, so the loop has one code path. The loop
    calls :meth:`update` after every step and :meth:`row` at every evaluation,
    which evaluates the averaged weights (batch-norm statistics recomputed
    first) into ``avg_<split>_<metric>`` columns, empty before the first
    averaged iterate.

    Args:
        model: the model being trained.
        config: what to average, or ``None``.
    """

    def __init__(self, model: nn.Module, config: AveragingConfig | None) -> None:
        self.average = None if config is None else IterateAverage(model, config)
        self.last: dict[str, dict[str, float]] = {}

    @classmethod
    def for_run(cls, model: nn.Module, kind: str | None, start: int, decay: float) -> Averaging:
        """A run's average (``kind=None``: none)."""
        return cls(model, None if kind is None else AveragingConfig(kind, start, decay))

    def update(self, model: nn.Module, steps_done: int) -> None:
        """Fold in the weights after ``steps_done`` steps, if due."""
        if self.average is not None:
            self.average.update(model, steps_done)

    def columns(self, metric_columns: Iterable[str]) -> list[str]:
        """``avg_`` + each evaluated column (``train_loss``, ``test_accuracy``, ...)."""
        if self.average is None:
            return []
        return [f"avg_{c}" for c in metric_columns if c.split("_")[0] in ("train", "val", "test")]

    def row(
        self, evaluate: Evaluate, batch_norm_batches: Callable[[], Iterable[Any]]
    ) -> dict[str, float | str]:
        """The averaged model's metrics (``evaluate``), after recomputing its batch-norm
        statistics from ``batch_norm_batches()``; empty values before any iterate."""
        if self.average is None or self.average.num_averaged == 0:
            return {}
        self.average.recompute_batch_norm(batch_norm_batches())
        self.last = evaluate(self.average.module)
        return {
            f"avg_{split}_{name}": value
            for split, values in self.last.items()
            for name, value in values.items()
        }

    def result(self) -> dict[str, Any]:
        """For ``RunResult.extra``: the averaged model's last evaluation and iterate count."""
        if self.average is None:
            return {}
        return {"averaged": self.last, "averaged_iterates": self.average.num_averaged}

    def state_dict(self) -> dict[str, Any]:
        if self.average is None:
            return {}
        return {"model": self.average.state_dict(), "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.average is not None:
            self.average.load_state_dict(state["model"])
            self.last = state["last"]
