"""Batch-size controllers: grow the batch during training instead of (or besides) decaying the step.

Bottou, Curtis & Nocedal (2018, Sec. 5.2) reduce the gradient noise by taking
larger samples as the iterate nears a solution: geometrically (their 5.6-5.7,
linear convergence with ``O(1/eps)`` total samples, Thm 5.3) or adaptively, as
soon as the batch's own statistics say its noise dominates its signal:

* :class:`NormTest` (their condition 5.12; Byrd, Chin, Nocedal & Wu 2012): keep
  the batch while ``tr(Sigma) / b <= theta^2 ||g||^2``; otherwise propose
  ``ceil(tr(Sigma) / (theta^2 ||g||^2))``.
* :class:`InnerProductTest` (Bollapragada, Byrd & Nocedal 2018, eqs. 2.6 and
  3.3): ``Var(g_i^T g) / b <= theta^2 ||g||^4``, optionally with the
  orthogonality test ``E||g_i - proj_g g_i||^2 / b <= nu^2 ||g||^2`` ("augmented").
* :class:`GeometricGrowth`: ``b_k = ceil(initial * factor^k)``.
* :class:`IncreaseInsteadOfDecay` (Smith, Kindermans, Ying & Le, ICLR 2018):
  at each milestone multiply the batch by ``factor`` where a step schedule would
  divide the learning rate by it; past ``max_batch_size`` the rest of the factor
  goes to the learning rate (:attr:`~BatchSizeController.lr_scale`).

A controller never shrinks the batch and never exceeds ``max_batch_size``; sizes
are rounded up to a multiple of ``multiple_of`` (ranks times accumulation
steps, so every rank gets equal micro-batches). The adaptive tests read a
:class:`~largebatch.diagnostics.per_example.GradientStatistics` of the step's
batch (``needs_statistics``); an optional geometric floor (``min_growth``) is the
review's back-up rule for when the adaptive rule grows too slowly.

Interface a training loop drives (one call per optimizer step)::

    controller = make_controller("norm-test", initial=64, max_batch_size=4096, theta=0.5)
    for step in ...:
        batch = draw(controller.batch_size)
        ... forward, backward (or gradient_statistics, which also gives the gradient) ...
        statistics = gradient_statistics(...) if controller.needs_statistics else None
        optimizer.step(); lr = base_lr * controller.lr_scale
        controller.update(statistics)           # the next step's batch size
        log(controller.record())                # batch_size, test_ratio, proposed_batch_size, lr_scale

Controllers hold plain Python numbers only; ``state_dict``/``load_state_dict``
round-trip exactly, so a resumed run continues with the same batch sizes.

:class:`BatchGrowth` is the training loop's side (``--batch-growth NAME``): it
builds the controller from a run's settings (:func:`build_controller`, which
also judges them), tells the step driver each step's batch size and which
statistics to compute, scales the learning rate, keeps the values
``metrics.csv`` shows and the steps where the batch size changed, and is
checkpointed with the run.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from largebatch.diagnostics.per_example import GradientStatistics
from largebatch.optim._classical import check_positive, check_positive_int
from largebatch.train.step import StatisticsRequest, check_per_example_model
from largebatch.utils.errors import ConfigError


class BatchSizeController(ABC):
    """Decides each step's batch size (module docstring).

    Args:
        initial: the first batch size.
        max_batch_size: the largest batch it ever proposes.
        multiple_of: every batch size is a multiple of this.
    """

    name: ClassVar[str]
    needs_statistics: ClassVar[bool] = False
    #: reads a batch's gradient statistics (on the steps where ``needs_statistics``)
    adaptive: ClassVar[bool] = False
    #: its statistics include the projections ``S3`` (inner-product, orthogonality tests)
    projections: ClassVar[bool] = False

    def __init__(self, initial: int, max_batch_size: int, multiple_of: int = 1) -> None:
        check_positive_int("initial", initial)
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("multiple_of", multiple_of)
        if initial % multiple_of or max_batch_size % multiple_of:
            raise ValueError(
                f"Invalid initial/max_batch_size: {initial}/{max_batch_size} "
                f"(expected multiples of multiple_of={multiple_of})"
            )
        if max_batch_size < initial:
            raise ValueError(
                f"Invalid max_batch_size: {max_batch_size} (expected >= initial={initial})"
            )
        self.initial = initial
        self.max_batch_size = max_batch_size
        self.multiple_of = multiple_of
        self.batch_size = initial
        self.steps = 0
        self.lr_scale = 1.0
        self.test_ratio = math.nan
        self.proposed_batch_size = initial

    def _clip(self, size: float) -> int:
        """``size`` rounded up to the grid, at least the current size, at most the maximum."""
        if not size < math.inf:
            return self.max_batch_size
        rounded = math.ceil(size / self.multiple_of) * self.multiple_of
        return min(max(self.batch_size, rounded), self.max_batch_size)

    def update(self, statistics: GradientStatistics | None = None) -> int:
        """Account for one step (on the current batch size); return the next batch size."""
        if self.needs_statistics and statistics is None:
            raise ValueError(f"Invalid statistics: None ({self.name} tests the step's batch)")
        self.proposed_batch_size = self._propose(statistics)
        self.steps += 1
        self.batch_size = self._clip(self.proposed_batch_size)
        return self.batch_size

    @abstractmethod
    def _propose(self, statistics: GradientStatistics | None) -> float:
        """The batch size the rule asks for after this step (before rounding and clipping)."""

    def record(self) -> dict[str, float]:
        """The per-step values a training loop logs."""
        return {
            "batch_size": float(self.batch_size),
            "proposed_batch_size": float(self.proposed_batch_size),
            "test_ratio": float(self.test_ratio),
            "lr_scale": float(self.lr_scale),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "lr_scale": self.lr_scale,
            "test_ratio": self.test_ratio,
            "proposed_batch_size": self.proposed_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(
                f"Invalid state: saved by {state['name']!r}, loading into {self.name!r}"
            )
        for key in ("batch_size", "steps", "lr_scale", "test_ratio", "proposed_batch_size"):
            setattr(self, key, state[key])


class _AdaptiveTest(BatchSizeController):
    """A statistics-driven test, run every ``every`` steps, with the review's geometric back-up floor."""

    adaptive = True

    def __init__(
        self,
        initial: int,
        max_batch_size: int,
        multiple_of: int = 1,
        min_growth: float | None = None,
        every: int = 1,
    ) -> None:
        super().__init__(initial, max_batch_size, multiple_of)
        if min_growth is not None and not (isinstance(min_growth, int | float) and min_growth >= 1):
            raise ValueError(f"Invalid min_growth: {min_growth} (expected None or >= 1)")
        check_positive_int("every", every)
        self.min_growth, self.every = min_growth, every

    @property
    def needs_statistics(self) -> bool:  # type: ignore[override]
        """Whether this step is tested (every ``every`` steps, from the first)."""
        return self.steps % self.every == 0

    def _propose(self, statistics: GradientStatistics | None) -> float:
        proposal = float(self.batch_size)
        if statistics is not None:
            proposal = max(proposal, self._test(statistics))
        if self.min_growth is not None:
            proposal = max(proposal, self.initial * self.min_growth ** (self.steps + 1))
        return proposal

    def _test(self, statistics: GradientStatistics) -> float:
        """The batch size the test asks for (records the test ratio)."""
        if statistics.num_samples < 2:
            raise ValueError(
                f"Invalid statistics: num_samples={statistics.num_samples} (a variance needs >= 2)"
            )
        needed = self._needed(statistics)
        self.test_ratio = needed / statistics.batch_size
        return needed if self.test_ratio > 1 else float(self.batch_size)

    @abstractmethod
    def _needed(self, statistics: GradientStatistics) -> float:
        """The smallest batch that passes the test with these variance estimates."""


class NormTest(_AdaptiveTest):
    """The norm test (review 5.12): grow while ``tr(Sigma)/b > theta^2 ||g||^2``.

    Args:
        theta: ``theta > 0`` (the review's ``chi``; smaller means larger batches).
        initial, max_batch_size, multiple_of: see :class:`BatchSizeController`.
        min_growth: optional geometric floor ``initial * min_growth^k``.
        every: test every ``every`` steps (the statistics cost is paid on those only;
            the batch stays put in between).
    """

    name = "norm-test"

    def __init__(
        self,
        initial: int,
        max_batch_size: int,
        theta: float = 0.5,
        multiple_of: int = 1,
        min_growth: float | None = None,
        every: int = 1,
    ) -> None:
        check_positive("theta", theta)
        super().__init__(initial, max_batch_size, multiple_of, min_growth, every)
        self.theta = theta

    def _needed(self, statistics: GradientStatistics) -> float:
        signal = self.theta**2 * statistics.mean_sqnorm
        return statistics.trace_covariance / signal if signal > 0 else math.inf


class InnerProductTest(_AdaptiveTest):
    """The inner-product test, augmented by the orthogonality test when ``nu`` is given.

    Args:
        theta: inner-product tolerance (0.9 in Bollapragada et al.).
        nu: orthogonality tolerance (``tan 80 deg = 5.84`` there); ``None`` omits it.
        initial, max_batch_size, multiple_of, min_growth, every: as for :class:`NormTest`.
    """

    name = "inner-product-test"
    projections = True

    def __init__(
        self,
        initial: int,
        max_batch_size: int,
        theta: float = 0.9,
        nu: float | None = None,
        multiple_of: int = 1,
        min_growth: float | None = None,
        every: int = 1,
    ) -> None:
        check_positive("theta", theta)
        if nu is not None:
            check_positive("nu", nu)
        super().__init__(initial, max_batch_size, multiple_of, min_growth, every)
        self.theta, self.nu = theta, nu

    def _needed(self, statistics: GradientStatistics) -> float:
        sqnorm = statistics.mean_sqnorm
        if sqnorm <= 0:
            return math.inf
        needed = statistics.inner_product_variance / (self.theta**2 * sqnorm**2)
        if self.nu is not None:
            needed = max(needed, statistics.orthogonal_variance / (self.nu**2 * sqnorm))
        return needed


class GeometricGrowth(BatchSizeController):
    """``b_k = ceil(initial * factor^k)`` (review 5.6-5.7; Thm 5.3 asks ``factor <= 1/(1 - lr c / 2)``).

    Args:
        factor: ``tau > 1``.
        initial, max_batch_size, multiple_of: see :class:`BatchSizeController`.
    """

    name = "geometric"

    def __init__(
        self, initial: int, max_batch_size: int, factor: float = 1.1, multiple_of: int = 1
    ) -> None:
        if not (isinstance(factor, int | float) and factor > 1 and math.isfinite(factor)):
            raise ValueError(f"Invalid factor: {factor} (expected > 1)")
        super().__init__(initial, max_batch_size, multiple_of)
        self.factor = factor

    def _propose(self, statistics: GradientStatistics | None) -> float:
        return self.initial * self.factor ** (self.steps + 1)


class IncreaseInsteadOfDecay(BatchSizeController):
    """Multiply the batch at each milestone where a step schedule would divide the learning rate.

    Past ``max_batch_size`` the remaining factor divides the learning rate instead
    (:attr:`lr_scale`, which the loop multiplies into its schedule), as Smith et
    al. do once the batch reaches the hardware's limit.

    Args:
        milestones: steps (strictly increasing, >= 1) at which the decay would happen.
        factor: the decay factor (> 1).
        initial, max_batch_size, multiple_of: see :class:`BatchSizeController`.
    """

    name = "increase-instead-of-decay"

    def __init__(
        self,
        initial: int,
        max_batch_size: int,
        milestones: Sequence[int] = (),
        factor: float = 5.0,
        multiple_of: int = 1,
    ) -> None:
        milestones = tuple(milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones) or any(
            b <= a for a, b in zip(milestones, milestones[1:])
        ):
            raise ValueError(f"Invalid milestones: {milestones} (expected increasing steps >= 1)")
        if not (isinstance(factor, int | float) and factor > 1 and math.isfinite(factor)):
            raise ValueError(f"Invalid factor: {factor} (expected > 1)")
        super().__init__(initial, max_batch_size, multiple_of)
        self.milestones, self.factor = milestones, factor

    def _propose(self, statistics: GradientStatistics | None) -> float:
        passed = sum(m <= self.steps + 1 for m in self.milestones)
        wanted = self.initial * self.factor**passed
        reached = self._clip(wanted)
        self.lr_scale = min(
            1.0, reached / wanted
        )  # the part of the factor the batch could not take
        return wanted


CONTROLLERS: dict[str, type[BatchSizeController]] = {
    cls.name: cls for cls in (NormTest, InnerProductTest, GeometricGrowth, IncreaseInsteadOfDecay)
}


def make_controller(name: str, **options: Any) -> BatchSizeController:
    """The controller registered as ``name`` (``--batch-growth NAME``), built with ``options``."""
    try:
        cls = CONTROLLERS[name]
    except KeyError:
        raise ValueError(
            f"Invalid batch growth: {name!r} (expected one of {sorted(CONTROLLERS)})"
        ) from None
    return cls(**options)


#: options of ``--batch-growth-opt`` that go to the statistics, not to the controller
STATISTICS_OPTIONS = ("group_size", "chunk_size")
#: controller arguments a run sets itself
_RUN_ARGUMENTS = ("initial", "max_batch_size", "multiple_of")


def batch_multiple(processes: int, accumulation_steps: int, group_size: int = 1) -> int:
    """The grid of batch sizes: every process gets whole micro-batches and whole groups."""
    return processes * math.lcm(accumulation_steps, group_size)


def build_controller(
    name: str,
    theta: float | None,
    options: Mapping[str, Any],
    *,
    initial: int,
    max_batch_size: int,
    processes: int = 1,
    accumulation_steps: int = 1,
) -> tuple[BatchSizeController, StatisticsRequest | None]:
    """A run's controller and the statistics it asks of each tested step (``None``: none).

    ``theta`` is ``--batch-growth-theta``; ``options`` are the controller's other
    arguments plus :data:`STATISTICS_OPTIONS`. Raises ``ConfigError`` naming an
    unknown name or option, or a bad value (the controllers' own ``ValueError``, which
    follows torch's schedulers, becomes one here: these are a run's settings).
    """
    if name not in CONTROLLERS:
        raise ConfigError(
            f"Invalid batch growth: {name!r} (expected one of {', '.join(sorted(CONTROLLERS))})"
        )
    cls = CONTROLLERS[name]
    options = dict(options)
    statistics = {key: options.pop(key) for key in STATISTICS_OPTIONS if key in options}
    accepted = [p for p in inspect.signature(cls).parameters if p not in _RUN_ARGUMENTS]
    if theta is not None:
        if "theta" in options:
            raise ConfigError(
                f"Invalid batch growth options: theta given twice ({theta}, {options['theta']})"
            )
        options["theta"] = theta
    valid = accepted + (list(STATISTICS_OPTIONS) if cls.adaptive else [])
    for key in [*options, *statistics]:
        if key not in valid:
            raise ConfigError(
                f"Invalid batch growth option {key!r} for {name!r} (accepted: {', '.join(valid)})"
            )
    try:
        for key, value in statistics.items():
            check_positive_int(key, value)
        group_size = statistics.get("group_size", 1)
        controller = cls(
            initial=initial,
            max_batch_size=max_batch_size,
            multiple_of=batch_multiple(processes, accumulation_steps, group_size),
            **options,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    request = StatisticsRequest(projections=cls.projections, **statistics) if cls.adaptive else None
    return controller, request


class BatchGrowth:
    """A run's batch size, step by step: the loop's side of a :class:`BatchSizeController`.

    Without a controller it does nothing and the batch stays ``batch_size``, so the
    loop has one code path. Per step the loop reads :attr:`batch_size` and
    :attr:`request` (the statistics the step driver computes for the controller),
    and after the optimizer's and the schedule's steps calls :meth:`update`.

    Args:
        controller: the controller, or ``None``.
        batch_size: the batch size without a controller.
        request: the statistics the controller reads.
    """

    COLUMNS = ("batch_size", "proposed_batch_size", "test_ratio", "lr_scale")

    def __init__(
        self,
        controller: BatchSizeController | None,
        batch_size: int,
        request: StatisticsRequest | None = None,
    ) -> None:
        self.controller = controller
        self._batch_size = batch_size
        self._request = request
        self.changes: list[tuple[int, int]] = []
        """``(step, batch size)`` at the start and wherever the size changed."""
        self._pending: list[dict[str, float | str]] = []

    @classmethod
    def for_run(
        cls,
        name: str | None,
        theta: float | None,
        options: Mapping[str, Any],
        *,
        batch_size: int,
        max_batch_size: int | None,
        processes: int,
        accumulation_steps: int,
        model: nn.Module,
    ) -> BatchGrowth:
        """The run's batch growth (``name=None``: none); ``ConfigError`` if its statistics
        cannot be computed for ``model`` (batch norm)."""
        if name is None:
            return cls(None, batch_size)
        controller, request = build_controller(
            name,
            theta,
            options,
            initial=batch_size,
            max_batch_size=max_batch_size or batch_size,
            processes=processes,
            accumulation_steps=accumulation_steps,
        )
        if request is not None:
            check_per_example_model(model, f"batch growth {name!r}")
        return cls(controller, batch_size, request)

    @property
    def batch_size(self) -> int:
        """The next step's global batch size."""
        return self._batch_size if self.controller is None else self.controller.batch_size

    @property
    def request(self) -> StatisticsRequest | None:
        """The statistics the next step must compute for the controller, if any."""
        if self.controller is None or not self.controller.needs_statistics:
            return None
        return self._request

    def update(
        self, step: int, statistics: GradientStatistics | None, optimizer: torch.optim.Optimizer
    ) -> None:
        """After step ``step`` (and the schedule's step): the next batch size, and the
        learning rate of every group multiplied by the controller's ``lr_scale``."""
        if self.controller is None:
            return
        if not self.changes:
            self.changes.append((step, self.controller.batch_size))
        before = self.controller.batch_size
        self.controller.update(statistics)
        if self.controller.batch_size != before:
            self.changes.append((step + 1, self.controller.batch_size))
        row = {"step": step + 1, **self.row(), "batch_size": before}
        if statistics is None:  # an untested step: no ratio of its own
            row["test_ratio"] = ""
        self._pending.append(row)
        if self.controller.lr_scale != 1.0:
            for group in optimizer.param_groups:
                group["lr"] *= self.controller.lr_scale

    @property
    def lr_scale(self) -> float:
        return 1.0 if self.controller is None else self.controller.lr_scale

    @property
    def columns(self) -> list[str]:
        """The ``metrics.csv`` columns (none without a controller)."""
        return list(self.COLUMNS) if self.controller is not None else []

    def row(self) -> dict[str, float | str]:
        """The last step's values (``test_ratio`` is empty on untested steps)."""
        if self.controller is None:
            return {}
        record = self.controller.record()
        return {key: "" if math.isnan(value) else value for key, value in record.items()}

    @property
    def step_columns(self) -> list[str]:
        """The ``batch_sizes.csv`` columns (none without a controller): per optimizer step
        (1-based), the batch it used, the size the rule proposed next, the test's ratio
        (empty on untested steps) and the learning-rate factor."""
        return ["step", *self.COLUMNS] if self.controller is not None else []

    def step_rows(self) -> list[dict[str, float | str]]:
        """The per-step rows since the last call (for ``batch_sizes.csv``)."""
        rows, self._pending = self._pending, []
        return rows

    def result(self) -> dict[str, Any]:
        """For ``RunResult.extra``: the final batch size and the steps where it changed."""
        if self.controller is None:
            return {}
        return {"final_batch_size": self.batch_size, "batch_size_changes": self.changes}

    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return {}
        return {
            "controller": self.controller.state_dict(),
            "changes": list(self.changes),
            "pending": list(self._pending),  # rows not yet written: a resumed run writes them
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
            self.changes = [tuple(change) for change in state["changes"]]
            self._pending = list(state.get("pending", []))
