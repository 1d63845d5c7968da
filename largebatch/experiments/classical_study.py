"""The optimization review's case study on ``logreg``: training loss against effective passes and time.

Bottou, Curtis & Nocedal (2018, Fig. 3.1 and Sec. 5-6) compare, on text
classification, plain SG, mini-batch SG, the variance-reduced methods (SVRG,
SAGA), dynamic sampling, stochastic quasi-Newton (oLBFGS, SQN) and full-batch
L-BFGS. Here each method is an **arm**: an ordinary sweep (its own directory,
results database and run directories) over a few learning rates, on the same
problem: ``logreg`` with 100 features (the data are then not separable, so the
minimum of the training loss is finite; with the default 1,000 features they
are, and every method drives the loss towards 0). No regulariser, so the
training loss is the objective.

* :func:`run_study` runs every arm (resuming like any sweep);
* :func:`study_curves` reads each arm's best run (lowest final training loss
  over its learning rates, three per arm, a factor 2.5-4 apart: the review's
  "repeated trial runs") from its
  ``metrics.csv``: effective passes (``example_gradients / n``), wall time
  and training loss;
* :func:`training_minimum` computes ``F*`` independently (SciPy's L-BFGS-B in
  float64 on the same training set), so the figures show ``F - F*``;
* :func:`study_figures` draws the two figures and :func:`study_table` the numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from largebatch.experiments.report import ReportContext
from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.sweep import prepare, run_sweep
from largebatch.experiments.sweep_config import SweepSpec, load_sweep
from largebatch.tasks import get_task
from largebatch.tasks.base import Task

TASK = "logreg"
TASK_OPTIONS = {"num_features": 100}
#: effective passes every arm is given (about; each arm's budget is set so it gets there)
PASSES = 20
#: the smallest gap the figures show: the training loss is evaluated in float32
FLOOR = 1e-7

#: label -> the arm's sweep keys (on top of :data:`COMMON`). Budgets are in epochs of
#: examples read; the effective passes per epoch differ (SVRG: 2 gradients per step plus a
#: full pass every 2 epochs, so 2.5; oLBFGS: 2; L-BFGS: one pass per step plus line search).
ARMS: dict[str, dict[str, Any]] = {
    "SG (b=1)": {
        "optimizers": ["sgd"], "batch_sizes": [1], "epochs": PASSES, "lrs": [0.0625, 0.25, 1.0],
    },
    "mini-batch SG (b=64)": {
        "optimizers": ["sgd"], "batch_sizes": [64], "epochs": PASSES, "lrs": [4.0, 16.0, 64.0],
    },
    "SVRG (b=16)": {
        "optimizers": ["svrg"], "batch_sizes": [16], "epochs": PASSES / 2.5,
        "lrs": [1.0, 4.0, 16.0], "optimizer": {"svrg": {"inner_steps": 450}},
    },
    "SAGA (b=16)": {
        "optimizers": ["saga"], "batch_sizes": [16], "epochs": PASSES, "lrs": [1.0, 4.0, 16.0],
    },
    "dynamic sampling (norm test, b=16 up)": {
        "optimizers": ["sgd"], "batch_sizes": [16], "epochs": PASSES, "lrs": [4.0, 16.0, 64.0],
        "batch_growths": ["norm-test"], "batch_growth_theta": 1.0,
    },
    "oLBFGS (b=64)": {
        "optimizers": ["olbfgs"], "batch_sizes": [64], "epochs": PASSES / 2,
        "lrs": [0.005, 0.02, 0.05],
    },
    "SQN (b=64, b_H=640, L=20)": {
        "optimizers": ["sqn"], "batch_sizes": [64], "epochs": PASSES / 2.5,
        "lrs": [0.005, 0.02, 0.05], "optimizer": {"sqn": {"hessian_batch_size": 640}},
    },
    "L-BFGS (full batch)": {
        "optimizers": ["lbfgs"], "batch_sizes": ["full"], "epochs": PASSES * 0.75, "lrs": [1.0],
    },
}  # fmt: skip
#: what every arm shares: the problem, plain SG (no momentum, no weight decay), a constant step
COMMON: dict[str, Any] = {
    "task": TASK,
    "task_options": TASK_OPTIONS,
    "seeds": [0],
    "evals_per_run": 40,
    "scaling": "none",
    "warmup_steps": 0,
    "schedule": "constant",
}
#: plain SG: no momentum, no weight decay (the registry's defaults have both)
SECTIONS: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.0, "weight_decay": 0.0}}
#: a quick study (the tests): 400 examples, 2 passes, the middle learning rate only
QUICK: dict[str, Any] = {"task_options": {**TASK_OPTIONS, "num_train": 400}, "evals_per_run": 4}
QUICK_SECTIONS: dict[str, dict[str, Any]] = {"sqn": {"hessian_batch_size": 128}}


def arm_specs(quick: bool = False) -> dict[str, SweepSpec]:
    """Each arm's checked sweep (``quick``: the small version the tests run)."""
    specs = {}
    for label, arm in ARMS.items():
        keys = {**COMMON, **arm}
        sections = {**SECTIONS, **arm.get("optimizer", {})}
        if quick:
            keys.update(
                QUICK, epochs=2 * arm["epochs"] / PASSES, lrs=arm["lrs"][len(arm["lrs"]) // 2 :][:1]
            )
            sections = {k: {**v, **QUICK_SECTIONS.get(k, {})} for k, v in sections.items()}
        keys["optimizer"] = sections
        specs[label] = load_sweep(overrides=keys, origins={(k,): f"arm {label!r}" for k in keys})
    return specs


def slug(label: str) -> str:
    """The arm's directory name."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def run_study(
    directory: str | Path, *, quick: bool = False, jobs: int = 1, progress: bool = True
) -> dict[str, dict[str, str]]:
    """Run every arm into ``directory/<arm>`` (finished runs are kept); their statuses."""
    directory = Path(directory)
    return {
        label: run_sweep(prepare(spec, directory / slug(label)), jobs=jobs, progress=progress)
        for label, spec in arm_specs(quick).items()
    }


@dataclass(frozen=True)
class Curve:
    """One arm's best run: training loss against effective passes and wall time."""

    label: str
    cell_id: str
    lr: float | None
    passes: np.ndarray
    seconds: np.ndarray
    train_loss: np.ndarray


def study_curves(directory: str | Path, quick: bool = False) -> dict[str, Curve]:
    """Each arm's finished run with the lowest final training loss, as a :class:`Curve`
    (among the arm's current cells: runs of an earlier grid stay in its database).

    A run at chance level counts as finished here: its training loss against passes
    is the comparison this study makes (an arm whose best run learned nothing shows so).
    """
    curves = {}
    for label, spec in arm_specs(quick).items():
        arm_dir = Path(directory) / slug(label)
        cells = {cell.cell_id for cell in prepare(spec, arm_dir).cells}
        rows = [
            r
            for r in ResultsStore(arm_dir).rows()
            if r["status"] in ("done", "chance") and r["cell_id"] in cells
        ]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["final_train_loss"])
        columns = ReportContext(arm_dir, rows).curves(best)
        num_train = _num_train(spec)
        curves[label] = Curve(
            label=label,
            cell_id=best["cell_id"],
            lr=best["config"]["lr"],
            passes=columns["example_gradients"] / num_train,
            seconds=columns["time"],
            train_loss=columns["train_loss"],
        )
    return curves


def _num_train(spec: SweepSpec) -> int:
    return len(get_task(spec.task, **spec.task_options).train)


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


def study_minimum(quick: bool = False) -> float:
    """``F*`` of the study's problem."""
    spec = next(iter(arm_specs(quick).values()))
    return training_minimum(get_task(spec.task, **spec.task_options))


def study_figures(curves: Mapping[str, Curve], minimum: float) -> tuple[Figure, Figure]:
    """``F - F*`` (log scale) against effective passes, and against wall time."""
    figures = []
    for axis, name in (("passes", "effective passes over the data"), ("seconds", "wall time (s)")):
        figure = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = figure.subplots()
        for i, curve in enumerate(curves.values()):
            gap = np.maximum(curve.train_loss - minimum, FLOOR)
            ax.plot(getattr(curve, axis), gap, color=f"C{i}", linewidth=1.5, label=curve.label)
        ax.set_yscale("log")
        if axis == "seconds":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("training loss − F*")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, framealpha=0.9)
        figures.append(figure)
    return figures[0], figures[1]


def study_table(
    curves: Mapping[str, Curve],
    minimum: float,
    passes: tuple[float, ...] = (1, 5, PASSES),
    target: float = 1e-2,
) -> list[list[str]]:
    """Per arm: learning rate, ``F - F*`` after each of ``passes`` effective passes, the
    passes and seconds until ``F - F*`` first falls to ``target``, and what the run took.

    Values between evaluations are interpolated (the gap on a log scale, linearly in
    passes or seconds), the last one held for a run within 5% of a column's passes;
    ``-`` where the run does not reach.
    """
    rows = []
    for curve in curves.values():
        log_gap = np.log10(np.maximum(curve.train_loss - minimum, FLOOR))
        end = curve.passes[-1] * 1.05  # a budget of p passes may stop just short of p
        gaps = [
            f"{10 ** np.interp(p, curve.passes, log_gap):.1e}" if p <= end else "-" for p in passes
        ]
        reached = [
            _first_crossing(x, log_gap, np.log10(target)) for x in (curve.passes, curve.seconds)
        ]
        lr = "-" if curve.lr is None else f"{curve.lr:g}"
        rows.append(
            [
                curve.label,
                lr,
                *gaps,
                *("-" if r is None else f"{r:.1f}" for r in reached),
                f"{curve.passes[-1]:.1f}",
                f"{curve.seconds[-1]:.1f}",
            ]
        )
    return rows


def _first_crossing(x: np.ndarray, y: np.ndarray, level: float) -> float | None:
    """Where ``y`` (linear between points) first falls to ``level``; ``None`` if never."""
    below = np.nonzero(y <= level)[0]
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(x[0])
    return float(np.interp(level, [y[i], y[i - 1]], [x[i], x[i - 1]]))


def write_study(directory: str | Path, figures_dir: str | Path, quick: bool = False) -> str:
    """Save the two figures (PNG) into ``figures_dir`` and return the numbers as Markdown."""
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    curves = study_curves(directory, quick)
    minimum = study_minimum(quick)
    by_passes, by_time = study_figures(curves, minimum)
    by_passes.savefig(figures_dir / "classical_passes.png", dpi=90)
    by_time.savefig(figures_dir / "classical_time.png", dpi=90)
    header = [
        "method", "lr", "F - F* @1 pass", "@5", f"@{PASSES}", "passes to 1e-2", "s to 1e-2",
        "passes run", "s run",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in study_table(curves, minimum)]
    return f"F* = {minimum:.8f} (SciPy L-BFGS-B, float64)\n\n" + "\n".join(lines) + "\n"
