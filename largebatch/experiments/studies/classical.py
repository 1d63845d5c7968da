"""Classical study: the optimization review's comparison of SG, variance reduction, dynamic
sampling and quasi-Newton methods on ``logreg`` (Bottou, Curtis & Nocedal 2018).

The review compares, on text classification (RCV1, its Fig. 3.1 and Sections
5-6), plain SG, mini-batch SG, SVRG, SAGA, dynamic sampling, stochastic
quasi-Newton (oLBFGS, SQN) and full-batch L-BFGS by the training loss they reach
per pass over the data. Here each method is one part (an **arm**: its own sweep
file, ``presets/classical-*.toml``, and sweep directory) over a few learning
rates on the same problem: ``logreg`` with 100 features (not separable, so the
training loss has a finite minimum ``F*``), no regulariser, a constant step.

The report shows ``F - F*`` against effective passes (``example_gradients / n``:
SVRG's snapshots and oLBFGS's second gradient count) and against wall time, for
each arm's run with the lowest final training loss (the review's "repeated trial
runs"; the training loss is the objective, so it is also the selection
criterion), the table of gaps at fixed pass counts, and the review's
expectations next to the measured ordering. ``F*`` is computed independently
(SciPy's L-BFGS-B in float64). A run whose loss ends at chance level still
counts: its curve is the result this study compares.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from largebatch.experiments.report import Plot, Section, Table, fmt
from largebatch.experiments.studies.base import (
    Part,
    PartResults,
    Study,
    StudyContext,
    StudyError,
    preset_path,
    register,
)
from largebatch.tasks import get_task
from largebatch.tasks.base import Task

#: effective passes every arm's budget is set for (``--quick``: ``QUICK_FRACTION`` of it)
PASSES = 20.0
QUICK_FRACTION = 0.1
#: the smallest gap the figures and tables show: the training loss is evaluated in float32
FLOOR = 1e-7
#: the gap whose first crossing the table reports (passes and seconds to it)
TARGET = 1e-2
#: how many times the constant-step arms' fitted decrease a variance-reduced arm's must be to
#: count as clearly faster (their fits on a fluctuating noise floor vary by tens of percent)
DECREASE_MARGIN = 1.25

#: part name (its directory) -> label; each part's sweep file is ``classical-<name>.toml``
ARMS: dict[str, str] = {
    "sg": "SG (b=1)",
    "minibatch-sg": "mini-batch SG (b=64)",
    "svrg": "SVRG (b=16)",
    "saga": "SAGA (b=16)",
    "norm-test": "dynamic sampling (norm test, b=16 up)",
    "olbfgs": "oLBFGS (b=64)",
    "sqn": "SQN (b=64, b_H=640, L=20)",
    "lbfgs": "L-BFGS (full batch)",
}
#: ``--quick``: 400 training examples, a tenth of the passes, the middle learning rate
QUICK: dict[str, Any] = {
    "task_options": {"num_features": 100, "num_train": 400},
    "evals_per_run": 4,
}
QUICK_SECTIONS: dict[str, dict[str, Any]] = {"sqn": {"hessian_batch_size": 128}}


def _arm(name: str) -> Part:
    """The part of arm ``name``, with its ``--quick`` keys derived from its sweep file."""
    file = f"classical-{name}.toml"
    data = tomllib.loads(preset_path(file).read_text())
    lrs = data["lrs"]
    quick = {**QUICK, "epochs": data["epochs"] * QUICK_FRACTION, "lrs": [lrs[len(lrs) // 2]]}
    sections = {k: v for k, v in QUICK_SECTIONS.items() if k in data["optimizers"]}
    if sections:
        quick["optimizer"] = {k: {**data["optimizer"][k], **v} for k, v in sections.items()}
    return Part(name, file, quick=quick)


# --- the measurements ---------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One arm's best run: training loss against effective passes and wall time."""

    label: str
    cell_id: str
    lr: float | None
    steps: int
    passes: np.ndarray
    seconds: np.ndarray
    train_loss: np.ndarray

    def gap(self, minimum: float) -> np.ndarray:
        """``F - F*`` at each evaluation, at least :data:`FLOOR`."""
        return np.maximum(self.train_loss - minimum, FLOOR)

    def gap_at(self, passes: float, minimum: float) -> float | None:
        """``F - F*`` after ``passes`` effective passes (log-linear between evaluations; the
        last value held for a run within 5% of ``passes``, which a budget may stop just
        short of); ``None`` beyond the run."""
        if passes > self.passes[-1] * 1.05:
            return None
        return float(10 ** np.interp(passes, self.passes, np.log10(self.gap(minimum))))

    def reaches(self, level: float, minimum: float, axis: str = "passes") -> float | None:
        """Passes (or seconds) until ``F - F*`` first falls to ``level``; ``None`` if never."""
        return first_crossing(getattr(self, axis), np.log10(self.gap(minimum)), np.log10(level))


def first_crossing(x: np.ndarray, y: np.ndarray, level: float) -> float | None:
    """Where ``y`` (linear between points) first falls to ``level``; ``None`` if never."""
    below = np.nonzero(y <= level)[0]
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(x[0])
    return float(np.interp(level, [y[i], y[i - 1]], [x[i], x[i - 1]]))


def best_curve(part: PartResults) -> Curve | None:
    """The arm's finished run with the lowest final training loss (``None`` if none).

    A run at chance level counts as finished here: its training loss against passes
    is the comparison this study makes (an arm whose best run learned nothing shows so).
    """
    rows = [r for r in part.wanted if r["status"] in ("done", "chance")]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["final_train_loss"])
    columns = part.report.curves(best)
    return Curve(
        label=ARMS.get(part.part.name, part.part.name),
        cell_id=best["cell_id"],
        lr=best["config"]["lr"],
        steps=best["steps"],
        passes=columns["example_gradients"] / part.factory.train_size,
        seconds=columns["time"],
        train_loss=columns["train_loss"],
    )


def study_curves(context: StudyContext) -> dict[str, Curve]:
    """Part name -> its best run's :class:`Curve`, for every arm with a finished run."""
    curves = {name: best_curve(part) for name, part in context.parts.items()}
    return {name: curve for name, curve in curves.items() if curve is not None}


def training_minimum(task: Task) -> float:
    """``min_w`` mean cross-entropy of the linear model on the training set (SciPy, float64)."""
    inputs, targets = (t.double() for t in _tensors(task.train))
    classes = int(targets.max()) + 1
    targets = targets.long()
    dim = inputs.shape[1]

    def loss_and_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
        flat = torch.tensor(w, requires_grad=True)
        weight, bias = flat[: classes * dim].view(classes, dim), flat[classes * dim :]
        loss = F.cross_entropy(inputs @ weight.T + bias, targets)
        (gradient,) = torch.autograd.grad(loss, flat)
        return float(loss.detach()), gradient.numpy()

    result = scipy.optimize.minimize(
        loss_and_gradient,
        np.zeros(classes * (dim + 1)),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 20_000},
    )
    return float(result.fun)


def _tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a (subset of a) tensor dataset's examples."""
    if hasattr(dataset, "indices"):
        inputs, targets = _tensors(dataset.dataset)
        index = torch.as_tensor(dataset.indices)
        return inputs[index], targets[index]
    return dataset.tensors


@cache
def _minimum(task: str, options: str) -> float:
    return training_minimum(get_task(task, **json.loads(options)))


def study_minimum(context: StudyContext) -> float:
    """``F*`` of the arms' common problem (they must share one: the gaps are compared)."""
    problems = {
        (p.factory.spec.task, json.dumps(p.factory.spec.task_options, sort_keys=True))
        for p in context.parts.values()
    }
    if len(problems) != 1:
        raise StudyError(f"the arms of study 'classical' train different problems: {problems}")
    return _minimum(*problems.pop())


# --- the report ---------------------------------------------------------------------------


def study_figures(curves: Mapping[str, Curve], minimum: float) -> tuple[Figure, Figure]:
    """``F - F*`` (log scale) against effective passes, and against wall time."""
    figures = []
    for axis, name in (("passes", "effective passes over the data"), ("seconds", "wall time (s)")):
        figure = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = figure.subplots()
        for i, curve in enumerate(curves.values()):
            x = getattr(curve, axis)
            keep = x > 0 if axis == "seconds" else slice(None)  # a log axis has no 0
            ax.plot(x[keep], curve.gap(minimum)[keep], color=f"C{i}", linewidth=1.5,
                    label=curve.label)  # fmt: skip
        ax.set_yscale("log")
        if axis == "seconds":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("training loss − F*")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, framealpha=0.9)
        figures.append(figure)
    return figures[0], figures[1]


def checkpoints(budget: float) -> tuple[float, float, float]:
    """The pass counts the table reads: early, a quarter of the budget, the budget."""
    return budget / 20, budget / 4, budget


def study_table(curves: Mapping[str, Curve], minimum: float, budget: float) -> Table:
    """Per arm: learning rate, ``F - F*`` at the :func:`checkpoints`, the passes and seconds
    until ``F - F*`` first falls to :data:`TARGET`, and what the run took."""
    passes = checkpoints(budget)
    rows = []
    for curve in curves.values():
        gaps = [curve.gap_at(p, minimum) for p in passes]
        reached = [curve.reaches(TARGET, minimum, axis) for axis in ("passes", "seconds")]
        rows.append(
            [
                curve.label,
                fmt(curve.lr),
                *("-" if g is None else f"{g:.1e}" for g in gaps),
                *("-" if r is None else f"{r:.1f}" for r in reached),
                f"{curve.steps:,}",
                f"{curve.passes[-1]:.1f}",
                f"{curve.seconds[-1]:.1f}",
            ]
        )
    columns = [
        "method", "lr", f"F - F* @{passes[0]:g} pass", f"@{passes[1]:g}", f"@{passes[2]:g}",
        f"passes to {TARGET:g}", f"s to {TARGET:g}", "steps", "passes run", "s run",
    ]  # fmt: skip
    return Table(columns, rows)


class Measured:
    """What the review's expectations are checked on: each arm's gap at a pass count."""

    def __init__(self, curves: Mapping[str, Curve], minimum: float, budget: float) -> None:
        self.curves, self.minimum = curves, minimum
        self.early, _, self.late = checkpoints(budget)

    def gap(self, arm: str, passes: float) -> float | None:
        curve = self.curves.get(arm)
        return None if curve is None else curve.gap_at(passes, self.minimum)

    def decrease(self, arm: str) -> float | None:
        """The factor by which ``F - F*`` falls over the second half of the budget: the slope
        of ``log F - F*`` against passes fitted to the evaluations there (a constant-step SG
        run fluctuates on its noise floor, so two end points would mislead)."""
        curve = self.curves.get(arm)
        if curve is None:
            return None
        half = self._second_half(curve)
        if half.sum() < 2:
            return None
        slope = np.polyfit(curve.passes[half], np.log10(curve.gap(self.minimum)[half]), 1)[0]
        return float(10 ** (-slope * self.late / 2))

    def _second_half(self, curve: Curve) -> np.ndarray:
        """The evaluations from half the budget to its end (5% beyond, as :meth:`Curve.gap_at`)."""
        return (curve.passes >= self.late / 2) & (curve.passes <= self.late * 1.05)

    def band_bottom(self, arm: str) -> float | None:
        """The lowest ``F - F*`` over the second half of the budget: the bottom of the band a
        constant-step run fluctuates in (its last point could lie anywhere inside, and its
        top is set by single spikes)."""
        curve = self.curves.get(arm)
        if curve is None or not self._second_half(curve).any():
            return None
        return float(curve.gap(self.minimum)[self._second_half(curve)].min())

    def reaches(self, arm: str, axis: str) -> float | None:
        curve = self.curves.get(arm)
        return None if curve is None else curve.reaches(TARGET, self.minimum, axis)

    def steps(self, arm: str) -> int | None:
        curve = self.curves.get(arm)
        return None if curve is None else curve.steps


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _one(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def _less(a: float | None, b: float | None) -> bool | None:
    """``a < b``, or ``None`` when either is missing."""
    return None if a is None or b is None else a < b


def _verdict(checks: list[bool | None]) -> str:
    """``yes`` if every check holds, ``no`` if none does, ``partly`` otherwise, ``-`` without data."""
    if not checks or any(c is None for c in checks):
        return "-"
    return "yes" if all(checks) else "no" if not any(checks) else "partly"


def _name(arm: str) -> str:
    return ARMS.get(arm, arm).split(" (")[0]


def expectations(measured: Measured) -> Table:
    """The review's expectations, each with our numbers and whether ours agree."""
    m, early, late = measured, measured.early, measured.late

    def at(passes: float, *arms: str) -> str:
        return ", ".join(f"{_name(arm)} {_sci(m.gap(arm, passes))}" for arm in arms)

    rows = []

    def row(claim: str, review: str, ours: str, checks: list[bool | None]) -> None:
        rows.append([claim, review, ours, _verdict(checks)])

    row(
        f"per pass, SG is ahead of full-batch L-BFGS early ({early:g} pass)",
        "Fig. 3.1: SG drops the empirical risk within the first epoch or two; batch L-BFGS "
        "takes one step per epoch",
        at(early, "sg", "lbfgs"),
        [_less(m.gap("sg", early), m.gap("lbfgs", early))],
    )
    row(
        f"full-batch L-BFGS catches up with SG over more passes ({late:g})",
        "Fig. 3.1: over more epochs the batch method would eventually overtake SG "
        "(work n log(1/ε) against 1/ε, Sec. 4.4)",
        at(late, "lbfgs", "sg"),
        [_less(m.gap("lbfgs", late), m.gap("sg", late))],
    )
    constant = ("sg", "minibatch-sg")
    falls = ", ".join(f"{_name(a)} {_one(m.decrease(a), 'x')}" for a in constant)
    bands = ", ".join(f"{_name(a)} {_sci(m.band_bottom(a))}" for a in constant)
    for vr in ("saga", "svrg"):
        decrease = m.decrease(vr)
        row(
            f"{_name(vr)} keeps converging where constant-step SG stalls: from {late / 2:g} to "
            f"{late:g} passes F - F* falls at least {DECREASE_MARGIN:g}x as much as the "
            "constant-step arms' (fitted), and ends below the whole band they fluctuate in there",
            "Sec. 5.3: linear rates (Johnson & Zhang; SAGA); Thm 4.6: SG with a fixed step "
            "settles on a noise floor",
            f"fell by {_one(decrease, 'x')} against {falls} (fitted); at {late:g} passes "
            f"{at(late, vr)} against the bands' bottoms {bands}",
            [
                _less(None if d is None else DECREASE_MARGIN * d, decrease)
                for d in map(m.decrease, constant)
            ]
            + [_less(m.gap(vr, late), m.band_bottom(sg)) for sg in constant],
        )
    row(
        "SG is better in the first epochs, SVRG when high accuracy is needed",
        "Sec. 5.3 (on SVRG in practice)",
        f"{early:g} pass: {at(early, 'sg', 'svrg')}; {late:g}: {at(late, 'sg', 'svrg')}",
        [
            _less(m.gap("sg", early), m.gap("svrg", early)),
            _less(m.gap("svrg", late), m.gap("sg", late)),
        ],
    )
    norm_steps, mini_steps = m.steps("norm-test"), m.steps("minibatch-sg")
    row(
        "dynamic sampling (norm test) saves steps, not passes: fewer steps than mini-batch "
        "SG, and no lower F - F* per pass",
        "Thm 5.1-5.3: linear convergence per iteration with O(1/ε) sample gradients, the "
        "same order as SG",
        f"steps: {fmt(norm_steps)} against {fmt(mini_steps)}; at {late:g} passes "
        f"{at(late, 'norm-test', 'minibatch-sg')}",
        [
            _less(norm_steps, mini_steps),
            _less(m.gap("minibatch-sg", late), m.gap("norm-test", late)),
        ],
    )
    row(
        "oLBFGS and SQN end below mini-batch SG",
        "Sec. 6.2: the rate stays sublinear; the gain is in the constant, which no "
        "longer depends on conditioning",
        f"at {late:g} passes {at(late, 'olbfgs', 'sqn', 'minibatch-sg')}",
        [_less(m.gap(q, late), m.gap("minibatch-sg", late)) for q in ("olbfgs", "sqn")],
    )
    passes = [m.reaches(arm, "passes") for arm in constant]
    seconds = [m.reaches(arm, "seconds") for arm in constant]
    row(
        f"mini-batch SG needs about the passes of SG to reach {TARGET:g} (within 2x), in less time",
        "Sec. 4.2: the same total work for the same accuracy; the gain is hardware efficiency",
        f"passes: SG {_one(passes[0])}, mini-batch SG {_one(passes[1])}; seconds: "
        f"{_one(seconds[0], ' s')}, {_one(seconds[1], ' s')}",
        [
            None if None in passes else max(passes) <= 2 * min(passes),
            _less(seconds[1], seconds[0]),
        ],
    )
    return Table(["expectation", "the review", "ours", "agrees"], rows)


def ordering(measured: Measured, passes: float) -> str:
    """The arms from the lowest ``F - F*`` to the highest after ``passes``."""
    gaps = [(measured.gap(arm, passes), arm) for arm in measured.curves]
    ranked = sorted((g, arm) for g, arm in gaps if g is not None)
    return " < ".join(ARMS.get(arm, arm).split(" (")[0] for _, arm in ranked) or "-"


def classical_sections(context: StudyContext) -> list[Section]:
    curves = study_curves(context)
    if not curves:
        return [Section("No results", "No run is recorded yet.")]
    minimum = study_minimum(context)
    budget = PASSES * (QUICK_FRACTION if context.quick else 1.0)
    by_passes, by_time = study_figures(curves, minimum)
    factory = next(iter(context.parts.values())).factory
    options = ", ".join(f"{k}={v}" for k, v in factory.spec.task_options.items())
    text = (
        f"`{factory.spec.task}` ({options}: {factory.train_size:,} training examples, a "
        "linear model), no regulariser: the training loss is the "
        f"objective, and F* = {minimum:.8g} (SciPy's L-BFGS-B in float64). Each arm "
        f"ran about {budget:g} effective passes (example gradients / n: SVRG's snapshots, "
        "oLBFGS's second gradient and SQN's Hessian products count) at a constant step, "
        "one torch thread per run; each arm's curve is its run with the lowest final "
        "training loss over its learning rates. Values between evaluations are "
        "interpolated (F - F* on a log scale); '-' where a run does not get there."
    )
    plots = [
        Plot("classical_passes", by_passes, "Training loss minus F* against effective passes"),
        Plot("classical_time", by_time, "Training loss minus F* against wall time"),
    ]
    main = Section(
        "Training loss against passes and time", text, plots, [study_table(curves, minimum, budget)]
    )
    measured = Measured(curves, minimum, budget)
    early, _, late = checkpoints(budget)
    expected = (
        "What the review leads one to expect, next to what these runs show ('agrees': yes, "
        "no, or partly when a claim has several comparisons and some hold). Ordering by "
        f"F - F*, lowest first: after {early:g} pass, {ordering(measured, early)}; after "
        f"{late:g} passes, {ordering(measured, late)}."
    )
    return [main, Section("The review's expectations next to ours", expected,
                          tables=[expectations(measured)])]  # fmt: skip


CLASSICAL = register(
    Study(
        name="classical",
        title="SG, variance reduction, dynamic sampling and quasi-Newton on logreg "
        "(Bottou, Curtis & Nocedal 2018)",
        question=(
            "Per pass over the data and per second, how do SG, mini-batch SG, SVRG, SAGA, "
            "dynamic sampling, oLBFGS, SQN and full-batch L-BFGS drive down the training "
            "loss of a convex problem, and is the ordering the one the review predicts?"
        ),
        parts=tuple(_arm(name) for name in ARMS),
        sections=classical_sections,
        minutes=(1.2, 0.1),
    )
)
