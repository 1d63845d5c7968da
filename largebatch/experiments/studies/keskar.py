"""Keskar study: is there a generalization gap when both batch sizes fit the training set, and are large-batch minima sharper?

Keskar et al. (ICLR 2017) train the same network with Adam at a small batch
(256) and a large one (10% of the training set) until the small batch fits the
training set, five seeds each, and report training and test accuracy (their
Table 2), the epsilon-sharpness of the solutions in the full space and in a
random 100-dimensional subspace at eps 1e-3 and 5e-4 (Tables 3 and 4), the loss
along the line between the two solutions (Fig. 3) and, as a remedy, large-batch
training warm-started from small-batch iterates after k epochs (Fig. 5). This
study does the same on three small networks; the sharpness and interpolation
come from :func:`~largebatch.experiments.diagnose.diagnose_sweep`.

The warm-started runs use the task ``largebatch.experiments.studies.keskar:warm_started``
(the user-task hook): the task of a finished run, its model starting from that
run's final weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from largebatch.experiments.analysis import Point
from largebatch.experiments.checkpoint_diagnostics import DiagnosticsSettings, load_run
from largebatch.experiments.diagnose import INTERPOLATION_FILE, diagnose_sweep
from largebatch.experiments.plots import interpolation_figure, log_axis
from largebatch.experiments.report import Plot, Section, Table, fmt
from largebatch.experiments.scheduler import map_in_workers
from largebatch.experiments.studies.base import (
    CellFactory,
    Part,
    PartResults,
    Row,
    Study,
    StudyContext,
    register,
)
from largebatch.experiments.studies.common import difference, mean_std, signed
from largebatch.experiments.sweep_config import Cell
from largebatch.tasks import Task

WARM_TASK = "largebatch.experiments.studies.keskar:warm_started"

#: Keskar et al., Table 2 (accuracy %, mean over 5 runs): F1 = MLP on MNIST, C1 = shallow CNN on CIFAR-10
PAPER_ACCURACY = {
    "F1 (MLP, MNIST)": (99.66, 99.92, 98.03, 97.81),
    "C1 (shallow CNN, CIFAR-10)": (99.89, 99.66, 80.04, 77.26),
}
#: Tables 3 and 4: sharpness (SB, LB) at eps 1e-3 and 5e-4, full space and random 100-dim subspace
PAPER_SHARPNESS = {
    "F1 (MLP, MNIST)": {
        "full": ((1.23, 205.14), (0.61, 42.90)),
        "subspace": ((0.11, 9.22), (0.05, 9.17)),
    },
    "C1 (shallow CNN, CIFAR-10)": {
        "full": ((28.58, 707.23), (7.08, 227.31)),
        "subspace": ((2.18, 137.25), (0.71, 29.50)),
    },
}
#: (column, space, epsilon) of the four sharpness measurements
SHARPNESS_COLUMNS = [
    ("sharpness", "full", 1e-3),
    ("sharpness_eps0.0005", "full", 5e-4),
    ("sharpness_subspace", "subspace", 1e-3),
    ("sharpness_subspace_eps0.0005", "subspace", 5e-4),
]

SETTINGS = DiagnosticsSettings(
    diagnostics=("sharpness", "eigenvalues"), num_examples=4096, batch_size=1024,
    epsilons=(1e-3, 5e-4), subspace_dim=100, k=1, tol=1e-2, max_products=60,
)  # fmt: skip
QUICK_SETTINGS = replace(SETTINGS, num_examples=256, subspace_dim=10, max_iter=3, max_products=8)
QUICK_MNIST1D = {
    "task_options": {"num_samples": 1000, "hidden": 32},
    "batch_sizes": [16, 72],
    "seeds": [0, 1],
    "epochs": 3,
    "evals_per_run": 2,
}


def warm_started(run: str = "") -> Task:
    """The task of the finished run in directory ``run``, its model starting from that run's weights."""
    saved = load_run(run)
    state = {key: value.detach().clone() for key, value in saved.model.state_dict().items()}
    base = saved.task

    def build_model():
        model = base.build_model()
        model.load_state_dict(state)
        return model

    return replace(base, name=WARM_TASK, build_model=build_model)


@dataclass(frozen=True)
class WarmStart:
    """Small-batch runs of ``starts`` epochs, each continued by a large-batch run from its weights.

    The part's sweep file is the small-batch phase (one optimizer, batch size and
    learning rate); its ``epochs`` is the length of the large-batch phase.
    """

    starts: tuple[float, ...]
    large_batch: int

    def prefix(self, factory: CellFactory, seed: int, start: float) -> Cell:
        ((optimizer, _, small), (lr,)), *_ = factory.groups().items()
        return factory.cell(optimizer, small, seed, lr, epochs=start)

    def continuation(self, factory: CellFactory, prefix: Cell) -> Cell:
        config = prefix.config
        return factory.cell(
            config.optimizer, self.large_batch, config.seed, config.lr,
            task=WARM_TASK, task_options={"run": str(prefix.run_dir)},
        )  # fmt: skip

    def cells(self, factory: CellFactory, rows: dict[str, Row]) -> list[Cell]:
        wanted = []
        for seed in factory.spec.seeds:
            for start in self.starts:
                prefix = self.prefix(factory, seed, start)
                wanted.append(prefix)
                if rows.get(prefix.cell_id, {}).get("status") == "done":
                    wanted.append(self.continuation(factory, prefix))
        return wanted


def finish(context: StudyContext, jobs: int, progress: bool) -> None:
    """Sharpness (and top Hessian eigenvalue) of every finished run; the SB-LB interpolation.

    One resumable ``diagnose_sweep`` pass per part, ``jobs`` parts at a time.
    """
    settings = QUICK_SETTINGS if context.quick else SETTINGS
    directories = [part.directory for part in context.parts.values() if part.rows]
    work = partial(diagnose_sweep, settings=settings, progress=progress and jobs == 1)
    map_in_workers(work, directories, jobs)


# --- the report -----------------------------------------------------------------------------


def _pair(part: PartResults) -> tuple[Point, Point] | None:
    """The small- and large-batch points of a main part."""
    points = sorted(part.report.points, key=lambda p: p.batch_size)
    return (points[0], points[-1]) if len(points) >= 2 else None


def accuracy_rows(context: StudyContext) -> list[list[str]]:
    rows = []
    for name, part in context.parts.items():
        pair = _pair(part) if part.part.name != "warm-start" else None
        if pair is None:
            continue
        sb, lb = pair
        gap = difference(sb, lb)
        rows.append(
            [
                f"{name} (SB {sb.batch_size:,}, LB {lb.batch_size:,})",
                *(mean_std(p.values("final_train_accuracy"), digits=2) for p in (sb, lb)),
                *(mean_std(p.values("final_test_accuracy"), digits=2) for p in (sb, lb)),
                signed(gap),
            ]
        )
    for name, (train_sb, train_lb, test_sb, test_lb) in PAPER_ACCURACY.items():
        rows.append(
            [
                f"paper: {name}",
                f"{train_sb:.2f}",
                f"{train_lb:.2f}",
                f"{test_sb:.2f}",
                f"{test_lb:.2f}",
                f"{test_sb - test_lb:+.2f}",
            ]  # fmt: skip
        )
    return rows


def sharpness_rows(context: StudyContext) -> list[list[str]]:
    rows = []
    for name, part in context.parts.items():
        pair = _pair(part) if part.part.name != "warm-start" else None
        if pair is None:
            continue
        sb, lb = pair
        cells = []
        for column, _, _ in SHARPNESS_COLUMNS:
            small, large = sb.values(column), lb.values(column)
            ratio = (
                large.mean() / small.mean()
                if small.size and large.size and small.mean() > 0
                else math.nan
            )
            cells += [mean_std(small, 1, None), mean_std(large, 1, None), fmt(ratio, 2)]
        rows.append([name, *cells])
    for name, spaces in PAPER_SHARPNESS.items():
        cells = []
        for _, space, epsilon in SHARPNESS_COLUMNS:
            small, large = spaces[space][0 if epsilon == 1e-3 else 1]
            cells += [f"{small:.2f}", f"{large:.2f}", fmt(large / small, 2)]
        rows.append([f"paper: {name}", *cells])
    return rows


def warm_start_rows(part: PartResults, protocol: WarmStart) -> list[dict[str, Any]]:
    """Per start epoch k: the continuations' test and training accuracy and sharpness over seeds."""
    result = []
    for start in protocol.starts:
        runs = []
        for seed in part.factory.spec.seeds:
            prefix = protocol.prefix(part.factory, seed, start)
            if prefix.cell_id not in part.by_id:
                continue
            cell = protocol.continuation(part.factory, prefix)
            row = part.by_id.get(cell.cell_id)
            if row is not None and row["status"] == "done":
                runs.append(row)
        values = {
            key: np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)
            for key in ("final_test_accuracy", "final_train_accuracy", "sharpness")
        }
        result.append({"start": start, "runs": len(runs), **values})
    return result


def warm_start_figure(rows: list[dict[str, Any]], sb: Point | None, lb: Point | None) -> Figure:
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, sharp_ax = fig.subplots(1, 2)
    starts = [r["start"] for r in rows if r["runs"]]
    test = [100 * r["final_test_accuracy"].mean() for r in rows if r["runs"]]
    sharp = [r["sharpness"].mean() if r["sharpness"].size else math.nan for r in rows if r["runs"]]
    acc_ax.plot(starts, test, "o-", color="C0", label="LB warm-started after k SB epochs")
    sharp_ax.plot(starts, sharp, "o-", color="C0")
    for point, color, label in ((sb, "C2", "SB only"), (lb, "C3", "LB only")):
        if point is None:
            continue
        acc_ax.axhline(100 * point.mean("final_test_accuracy"), color=color, linestyle="--",
                       label=label)  # fmt: skip
        if point.values("sharpness").size:
            sharp_ax.axhline(point.mean("sharpness"), color=color, linestyle="--", label=label)
    for ax in (acc_ax, sharp_ax):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(starts))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("small-batch epochs k before switching")
        ax.grid(True, which="both", alpha=0.3)
    acc_ax.set_ylabel("final test accuracy (%)")
    sharp_ax.set_ylabel("ε-sharpness (ε = 1e-3, full space)")
    if all(v > 0 for v in sharp if not math.isnan(v)) and any(not math.isnan(v) for v in sharp):
        log_axis(sharp_ax)
    acc_ax.legend(fontsize=9)
    fig.suptitle("Warm-starting the large batch from small-batch iterates (Keskar et al., Fig. 5)")
    return fig


def keskar_sections(context: StudyContext) -> list[Section]:
    if not any(part.rows for part in context.parts.values()):
        return [Section("No results", "No run is recorded yet.")]
    settings = QUICK_SETTINGS if context.quick else SETTINGS
    main = [p for p in context.parts.values() if p.part.name != "warm-start"]
    text = (
        "Final training and test accuracy in % (mean ± std over seeds) of Adam at the small "
        "batch (SB) and at the large batch (LB, 10% of the training set), the same constant "
        "learning rate for both, trained for as many epochs as the small batch needs to fit the "
        "training set (the sweep files give the settings). Last column: SB − LB test accuracy "
        "(± standard error, Welch p). Keskar et al.'s rows are MNIST and CIFAR-10 networks "
        "(their Table 2): similar training accuracy, test gaps of 0.2 to 5.3 points."
    )
    sections = [
        Section(
            "Is there a generalization gap when both batch sizes fit the training set?",
            text,
            tables=[
                Table(
                    ["network", "train SB", "train LB", "test SB", "test LB", "test gap SB − LB"],
                    accuracy_rows(context),
                )
            ],  # fmt: skip
        )
    ]
    columns = ["network"]
    for _, space, epsilon in SHARPNESS_COLUMNS:
        columns += [f"SB {space} {epsilon:g}", f"LB {space} {epsilon:g}", "LB / SB"]
    sections.append(
        Section(
            "Are large-batch minima sharper?",
            "Keskar et al.'s ε-sharpness (the largest rise of the training loss, in %, when "
            "every weight may move by ε(|w| + 1), maximised by "
            f"{settings.max_iter} L-BFGS-B iterations from a random point of the box) on a "
            f"fixed subset of {settings.num_examples:,} training examples, in the full space "
            f"and in a random {settings.subspace_dim}-dimensional subspace, at ε = 1e-3 and "
            "5e-4 (their Tables 3 and 4), mean ± std over seeds. The paper finds LB 1-2 orders "
            "of magnitude sharper than SB everywhere.",
            tables=[Table(columns, sharpness_rows(context))],
        )
    )
    plots = []
    for part in main:
        try:
            saved = json.loads((part.directory / INTERPOLATION_FILE).read_text())
        except (OSError, ValueError):
            continue
        for series, entry in saved.items():
            small, large = entry["small"]["batch_size"], entry["large"]["batch_size"]
            figure = interpolation_figure(
                entry, f"SB {small:,}", f"LB {large:,}", title=f"{part.part.name} ({series})"
            )
            plots.append(Plot(f"keskar_interpolation_{part.part.name}", figure,
                              f"{part.part.name}: from the SB solution (α = 0) to the LB one (α = 1)"))  # fmt: skip
    if plots:
        sections.append(
            Section(
                "The loss between the two solutions (Keskar et al., Fig. 3)",
                "Loss and accuracy of the weights (1 − α)·SB + α·LB on training (solid) and test "
                "(dashed) subsets, both runs from the same initialisation (seed 0). A sharp "
                "minimum shows as a steep rise of the loss next to its end.",
                plots,
            )
        )
    warm = context.parts.get("warm-start")
    if warm is not None and warm.rows and isinstance(warm.protocol, WarmStart):
        rows = warm_start_rows(warm, warm.protocol)
        source = context.parts.get(warm.factory.spec.task)
        pair = _pair(source) if source is not None and source.rows else None
        sb, lb = pair if pair else (None, None)
        table = Table(
            ["SB epochs k", "seeds", "LB test acc %", "LB train acc %", "LB sharpness (1e-3)"],
            [[f"{r['start']:g}", str(r["runs"]), mean_std(r["final_test_accuracy"]),
              mean_std(r["final_train_accuracy"]), mean_std(r["sharpness"], 1, None)]
             for r in rows],
        )  # fmt: skip
        sections.append(
            Section(
                "Remedy: warm-starting the large batch from small-batch iterates",
                f"Small batch ({warm.factory.spec.batch_sizes[0]}) for k epochs, then the large "
                f"batch ({warm.protocol.large_batch:,}) for {warm.factory.spec.epochs:g} epochs "
                "from those weights with a fresh optimizer (Keskar et al., Fig. 5: after enough "
                "small-batch epochs the large batch reaches small-batch test accuracy and its "
                "sharpness drops). Dashed: the plain SB and LB runs of the same network.",
                [
                    Plot(
                        "keskar_warm_start",
                        warm_start_figure(rows, sb, lb),
                        "Large batch warm-started after k small-batch epochs",
                    )
                ],  # fmt: skip
                [table],
            )
        )
    return sections


KESKAR = register(
    Study(
        name="keskar",
        title="small vs large batch: generalization gap and sharp minima (Keskar et al. 2017)",
        question=(
            "Is there a generalization gap between a small batch (256) and a large one (10% of "
            "the data) when both fit the training set, are the large-batch solutions sharper, "
            "and does warm-starting the large batch from small-batch iterates close the gap?"
        ),
        parts=(
            Part("mnist1d-mlp", "keskar-mnist1d-mlp.toml", quick=QUICK_MNIST1D),
            Part(
                "mnist1d-cnn",
                "keskar-mnist1d-cnn.toml",
                quick={**QUICK_MNIST1D, "task": "mnist1d-mlp"},
            ),  # fmt: skip
            Part(
                "digits-cnn",
                "keskar-digits-cnn.toml",
                quick={
                    "task_options": {"channels": 4},
                    "seeds": [0, 1],
                    "epochs": 2,
                    "evals_per_run": 2,
                },
            ),  # fmt: skip
            Part(
                "warm-start",
                "keskar-warm-start.toml",
                WarmStart(starts=(1, 2, 5, 10, 25, 50), large_batch=864),
                quick={
                    **QUICK_MNIST1D,
                    "task": "mnist1d-mlp",
                    "batch_sizes": [16],
                    "epochs": 2,
                },  # fmt: skip
                quick_protocol=WarmStart(starts=(1, 2), large_batch=72),
                report=False,
            ),
        ),
        sections=keskar_sections,
        finish=finish,
        minutes=(10, 0.5),
    )
)
