"""From result rows to the numbers of a batch-size study.

Pure functions over the rows of :class:`~largebatch.experiments.results_store.ResultsStore`
(dicts): group runs into one :class:`Point` per series (optimizer, and topology for
a decentralized one) and batch size, pick the learning rate on the validation split
(never the test split), aggregate seeds, and locate the critical batch size. The
report, the printed summary and the tests all use these, so there is one definition
of each number.

Critical batch size (``critical_batch_size``): with ``S(B)`` the steps to reach
the target at batch size ``B`` and ``B0`` the smallest batch size that reached
it, perfect scaling predicts ``S(B0) * B0 / B``. The critical batch size is the
``B`` at which the measured ``S(B)`` is ``factor`` (default 2) times that
prediction, i.e. where examples-to-target ``B * S(B)`` has doubled relative to
``B0``; it is interpolated on log-log axes between the neighbouring measured
batch sizes. Under McCandlish et al.'s model ``S(B) = S_min (1 + B_crit / B)``
this is ``2 B0 + B_crit``, so for ``B0`` well below it, it matches their
``B_crit = E_min / S_min``, the batch size costing twice the minimal steps and
twice the minimal examples (Shallue et al. call the region below it "perfect
scaling" and above it "diminishing returns"). That model is also fitted
(:func:`fit_steps_model`) as a second estimate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls

from largebatch.experiments.sweep_config import LATER_FIELDS, adaptive_method, series_name
from largebatch.train.config import RESUMABLE_CHANGES
from largebatch.utils.errors import ConfigError

#: config fields that differ between the cells of one series by design, that name
#: the series, or that do not change a run's outcome
_CELL_FIELDS = {
    "batch_size", "seed", "lr", "optimizer", "topology", "eval_every", *RESUMABLE_CHANGES
}  # fmt: skip


def _series_labels(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """cell_id -> series label: the optimizer and its topology (:func:`series_name`),
    ``+ autowu`` or ``+ adascale`` for a run that sets its own rate (:func:`adaptive_method`),
    plus config fields that vary within them.

    A field varies within a series' runs when it takes several values at one
    batch size; a field set per batch size (e.g. a study's budget with a floor on
    the number of steps) is part of the cell, not a separate series. A field added
    after a row was recorded (:data:`LATER_FIELDS`) counts at its default there, so a
    resumed study's old and new runs stay one series.
    """
    by_optimizer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        name = series_name(row["optimizer"], row["config"].get("topology"))
        method = adaptive_method(row["config"])
        by_optimizer[name if method is None else f"{name} + {method}"].append(row)
    labels = {}
    for optimizer, group in by_optimizer.items():
        keys = sorted({k for row in group for k in row["config"]} - _CELL_FIELDS)
        values = defaultdict(set)
        for row in group:
            for k in keys:
                values[k, row["batch_size"]].add(repr(_field(row, k)))
        varying = [k for k in keys if any(len(values[k, row["batch_size"]]) > 1 for row in group)]
        for row in group:
            detail = ", ".join(f"{k}={_field(row, k)}" for k in varying)
            labels[row["cell_id"]] = f"{optimizer} ({detail})" if detail else optimizer
    return labels


def _field(row: dict[str, Any], key: str) -> Any:
    """``key`` of the row's config, or its :data:`LATER_FIELDS` default if recorded before it."""
    return row["config"].get(key, LATER_FIELDS.get(key))


@dataclass
class Point:
    """One series at one batch size: the runs (seeds) of the selected learning rate.

    Attributes:
        series: the optimizer (and topology), plus any config field that varies within its runs.
        lr: the selected base learning rate (``None``: the registry default).
        lrs: every base learning rate tried.
        selected_by: how ``lr`` was chosen (validation metric, or "only one").
        runs: the rows of the selected learning rate, one per seed.
    """

    series: str
    optimizer: str
    batch_size: int
    lr: float | None
    lrs: tuple[float | None, ...]
    selected_by: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> np.ndarray:
        """``key`` over the seeds whose run finished normally ("done")."""
        vals = [row.get(key) for row in self.runs if row["status"] == "done"]
        return np.array([v for v in vals if v is not None], dtype=float)

    def mean(self, key: str) -> float:
        vals = self.values(key)
        return float(vals.mean()) if vals.size else math.nan

    def spread(self, key: str) -> tuple[float, float]:
        """(min, max) over seeds, for bands and error bars."""
        vals = self.values(key)
        return (float(vals.min()), float(vals.max())) if vals.size else (math.nan, math.nan)

    def std(self, key: str) -> float:
        """Sample standard deviation over seeds (NaN with fewer than two)."""
        vals = self.values(key)
        return float(vals.std(ddof=1)) if vals.size > 1 else math.nan

    @property
    def statuses(self) -> list[str]:
        return [row["status"] for row in self.runs]

    def median_to_target(self, key: str = "steps_to_target") -> float:
        """Median over seeds, a run that never reached the target counting as infinite."""
        vals = [
            row[key] if row["status"] == "done" and row.get(key) is not None else math.inf
            for row in self.runs
        ]
        return float(np.median(vals)) if vals else math.inf


Score = tuple[int, float]


def selection_score(runs: Sequence[dict[str, Any]]) -> tuple[Score, str]:
    """Score of one learning rate (higher is better) and the name of the criterion.

    The first entry counts the runs that succeeded: finished normally ("done";
    diverged, chance-level and failed runs count as worst) and, for runs that
    stop at their target, reached it. The second breaks ties: if every run stops
    at its target, fewer steps to it (Shallue et al.'s criterion); otherwise
    validation accuracy if recorded, else validation loss. The test split is
    never looked at.
    """
    done = [r for r in runs if r["status"] == "done"]
    if runs and all(r["config"].get("stop_at_target") for r in runs):
        reached = [r["steps_to_target"] for r in done if r.get("steps_to_target") is not None]
        return (len(reached), -float(np.mean(reached)) if reached else -math.inf), "steps to target"
    for key, sign, name in (
        ("final_val_accuracy", 1.0, "val accuracy"),
        ("final_val_loss", -1.0, "val loss"),
    ):
        vals = [r[key] for r in done if r.get(key) is not None]
        if vals and len(vals) == len(done):
            return (len(done), sign * float(np.mean(vals))), name
    return (len(done), -math.inf), "val (not recorded)"


def choose(scores: Mapping[float | None, Score]) -> float | None:
    """The learning rate with the best score; ties go to the one nearest the middle of the grid.

    The tie rule keeps a plateau of equally good values (e.g. validation accuracy
    saturated at 100%) from counting as a best value at the edge of the grid.
    """
    lrs = sorted(scores, key=lambda lr: -1.0 if lr is None else lr)
    best = max(scores.values())
    middle = (len(lrs) - 1) / 2
    tied = [i for i, lr in enumerate(lrs) if scores[lr] == best]
    return lrs[min(tied, key=lambda i: (abs(i - middle), i))]


def points(rows: Iterable[dict[str, Any]]) -> list[Point]:
    """One :class:`Point` per (series, batch size), learning rate chosen on validation.

    With one learning rate per point there is nothing to choose. Otherwise the
    learning rate with the best :func:`selection_score` wins (most successful
    seeds, then mean final validation accuracy, validation loss or, for runs
    that stop at their target, fewest steps to it), ties resolved by
    :func:`choose`. Sorted by series, then batch size.
    """
    rows = list(rows)
    labels = _series_labels(rows)
    groups: dict[tuple[str, int], dict[float | None, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    optimizers = {}
    for row in rows:
        key = (labels[row["cell_id"]], row["batch_size"])
        groups[key][row["lr"]].append(row)
        optimizers[key[0]] = row["optimizer"]
    result = []
    for (series, batch_size), by_lr in sorted(groups.items()):
        lrs = tuple(sorted(by_lr, key=lambda lr: -1.0 if lr is None else lr))
        if len(lrs) == 1:
            chosen, selected_by = lrs[0], "only one"
        else:
            scored = {lr: selection_score(runs) for lr, runs in by_lr.items()}
            chosen = choose({lr: score for lr, (score, _) in scored.items()})
            selected_by = scored[chosen][1]
        runs = sorted(by_lr[chosen], key=lambda r: r["seed"])
        result.append(Point(series, optimizers[series], batch_size, chosen, lrs, selected_by, runs))
    return result


def by_series(pts: Iterable[Point]) -> dict[str, list[Point]]:
    """Points grouped by series, each list sorted by batch size."""
    grouped: dict[str, list[Point]] = defaultdict(list)
    for p in pts:
        grouped[p.series].append(p)
    return {s: sorted(ps, key=lambda p: p.batch_size) for s, ps in sorted(grouped.items())}


@dataclass(frozen=True)
class CriticalBatch:
    """Where perfect scaling ends, per the definition in this module's docstring.

    ``estimate`` is the interpolated batch size; when it cannot be interpolated
    (the next batch size never reached the target, or none fell off) it is
    ``None`` and ``low``/``high`` bound it (``high`` ``None``: beyond the sweep).
    """

    estimate: float | None
    low: float | None
    high: float | None
    reference: float | None
    factor: float

    def describe(self) -> str:
        if self.reference is None:
            return "undefined (target never reached)"
        if self.estimate is not None:
            return f"≈ {self.estimate:,.0f}"
        if self.high is None:
            return f"> {self.low:,.0f} (scaling never fell off)"
        return f"between {self.low:,.0f} and {self.high:,.0f}"


def critical_batch_size(
    batch_sizes: Sequence[float], steps: Sequence[float], factor: float = 2.0
) -> CriticalBatch:
    """The batch size where steps-to-target is ``factor`` x the perfect-scaling prediction.

    ``steps[i]`` is the steps-to-target at ``batch_sizes[i]`` (``inf``: never reached;
    zero, a target met before training, is ignored).
    """
    if factor <= 1:
        raise ConfigError(f"Invalid factor: {factor} (must be > 1)")
    order = np.argsort(batch_sizes)
    b = np.asarray(batch_sizes, dtype=float)[order]
    s = np.asarray(steps, dtype=float)[order]
    b, s = b[s > 0], s[s > 0]  # a target met before any step says nothing about scaling
    finite = np.flatnonzero(np.isfinite(s))
    if finite.size == 0:
        return CriticalBatch(None, None, None, None, factor)
    first = finite[0]
    b, s = b[first:], s[first:]
    ratio = s * b / (s[0] * b[0])  # measured / perfect-scaling steps = examples ratio
    for i in range(1, len(b)):
        if ratio[i] > factor:
            if not np.isfinite(ratio[i]):
                return CriticalBatch(None, b[i - 1], b[i], b[0], factor)
            t = (math.log(factor) - math.log(ratio[i - 1])) / (
                math.log(ratio[i]) - math.log(ratio[i - 1])
            )
            estimate = math.exp(math.log(b[i - 1]) + t * (math.log(b[i]) - math.log(b[i - 1])))
            return CriticalBatch(estimate, b[i - 1], b[i], b[0], factor)
    return CriticalBatch(None, b[-1], None, b[0], factor)


@dataclass(frozen=True)
class StepsModel:
    """McCandlish et al.'s ``S(B) = S_min (1 + B_crit / B)``, fitted to measured steps."""

    s_min: float
    b_crit: float

    def steps(self, batch_size: np.ndarray | float) -> np.ndarray | float:
        return self.s_min * (1 + self.b_crit / np.asarray(batch_size, dtype=float))


def fit_steps_model(batch_sizes: Sequence[float], steps: Sequence[float]) -> StepsModel | None:
    """Least-squares fit in relative error over the finite points (needs three).

    ``S = S_min + E_min / B`` is linear in ``(S_min, E_min)``; both are kept
    non-negative (scipy's ``nnls``) and ``B_crit = E_min / S_min``.
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    keep = np.isfinite(s) & (s > 0)
    if keep.sum() < 3:
        return None
    b, s = b[keep], s[keep]
    design = np.stack([1 / s, 1 / (b * s)], axis=1)  # rows scaled by 1/S: relative residuals
    (s_min, e_min), _ = nnls(design, np.ones_like(s))
    if s_min <= 0:
        return None
    return StepsModel(float(s_min), float(e_min / s_min))
