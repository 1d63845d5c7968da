"""Adaptive schedules beside per-cell tuning: the cells the alto and scaling studies add, and
their report section.

Does an adaptive schedule (AutoWU, AdaScale: docs/training.md) reach what the
learning rate tuned per optimizer and batch size reaches, and at what fraction of
the tuning's cost? Each adaptive cell runs once per seed (:class:`~.base.Adaptive`);
its cost is set against the tuning's (every run of the grid, then the seeds), in
runs and in run-seconds (the ``wall_time`` of each run: one torch thread per run,
two runs at a time on two cores, so close to its CPU time).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from largebatch.experiments.analysis import Point
from largebatch.experiments.report import Plot, Section, Table, add_legend, batch_size_axis, fmt
from largebatch.experiments.studies.base import Adaptive, PartResults
from largebatch.experiments.studies.common import (
    FLAGS,
    accuracy_text,
    difference,
    finite,
    flag,
    signed,
)
from largebatch.experiments.sweep_config import adaptive_method

#: SGD and LAMB only: AdaScale was built for momentum SGD and AutoWU tested with LAMB, they
#: are the two ends of the tuned studies, and every optimizer would take the studies past
#: their 30 minutes (see the presets' comments)
ADAPTIVE = Adaptive(optimizers=("sgd", "lamb"))
#: ``--quick``: LAMB alone (every path of the protocol and the report, at half the runs)
QUICK_ADAPTIVE = Adaptive(optimizers=("lamb",))
NAMES = {"autowu": "AutoWU", "adascale": "AdaScale"}
#: how AdaScale at its own base batch is shown: it is the tuned run there (gain 1)
AT_BASE = "= tuned (base batch)"

Key = tuple[str, int]  # (optimizer, batch size)


class Columns:
    """The tuned and adaptive points of one part, keyed by (optimizer, batch size)."""

    def __init__(self, part: PartResults) -> None:
        self.part = part
        self.tuned: dict[Key, Point] = {(p.optimizer, p.batch_size): p for p in part.report.points}
        groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
        for row in part.adaptive:
            method = adaptive_method(row["config"])
            groups[method, row["optimizer"], row["batch_size"]].append(row)
        self.adaptive: dict[str, dict[Key, Point]] = {m: {} for m in NAMES}
        for (method, optimizer, batch_size), rows in groups.items():
            runs = sorted(rows, key=lambda r: r["seed"])
            point = Point(
                f"{optimizer} + {NAMES[method]}", optimizer, batch_size, runs[0]["lr"],
                (runs[0]["lr"],), NAMES[method], runs,
            )  # fmt: skip
            self.adaptive[method][optimizer, batch_size] = point
        present = {optimizer for _, optimizer, _ in groups}
        self.optimizers = [o for o in part.factory.spec.optimizers if o in present]
        self.batch_sizes = sorted({b for (_, b) in self.tuned} | {k[2] for k in groups})
        self.base_batch = min(self.batch_sizes) if self.batch_sizes else None

    def keys(self) -> list[Key]:
        return [(o, b) for b in self.batch_sizes for o in self.optimizers]

    def cell(self, method: str, key: Key, text: Callable[[Point | None], str]) -> str:
        if method == "adascale" and key[1] == self.base_batch:
            return AT_BASE
        return text(self.adaptive[method].get(key)) or "-"

    def table(
        self,
        value: Callable[[Point | None], str],
        versus: Callable[[Point | None, Point | None], str],
        header: str,
    ) -> Table:
        """Per batch size and optimizer: tuned, AutoWU, AdaScale, and each against tuned."""
        rows = []
        for key in self.keys():
            tuned = self.tuned.get(key)
            row = [f"{key[1]:,}", key[0], value(tuned) or "-"]
            row += [self.cell(m, key, value) for m in NAMES]
            row += [
                "-" if (m == "adascale" and key[1] == self.base_batch) else
                versus(self.adaptive[m].get(key), tuned)
                for m in NAMES
            ]  # fmt: skip
            rows.append(row)
        columns = ["batch", "optimizer", f"tuned: {header}", *NAMES.values()]
        columns += [f"{name} vs tuned" for name in NAMES.values()]
        return Table(columns, rows)

    def choices(self) -> Table:
        """What each schedule set: the tuned rate, AutoWU's switch and peak, AdaScale's gain."""
        train_size = self.part.factory.train_size
        rows = []
        for key in self.keys():
            tuned = self.tuned.get(key)
            used = tuned.runs[0]["extra"].get("lr") if tuned and tuned.runs else None
            autowu = self.adaptive["autowu"].get(key)
            adascale = self.adaptive["adascale"].get(key)
            row = [f"{key[1]:,}", key[0], fmt(used)]
            if autowu is None:
                row += ["-", "-"]
            else:
                peaks = finite([r["extra"].get("autowu_peak_lr") for r in autowu.runs])
                reasons = [r["extra"].get("autowu_switch_reason") for r in autowu.runs]
                switch = finite(
                    [
                        r["extra"]["autowu_switch_step"] / r["extra"]["total_steps"]
                        for r in autowu.runs
                        if r["extra"].get("autowu_switch_step") is not None
                        and r["extra"].get("total_steps")
                    ]
                )  # fmt: skip
                counts = ", ".join(
                    f"{reason} {reasons.count(reason)}" for reason in sorted(set(reasons) - {None})
                )
                row += [
                    fmt(float(np.median(peaks))) if peaks else "-",
                    f"{np.median(switch):.0%} ({counts})" if switch else "-",
                ]
            if key[1] == self.base_batch:
                row += [AT_BASE, "-"]
            elif adascale is None:
                row += ["-", "-"]
            else:
                gains = finite([r["extra"].get("adascale_gain") for r in adascale.runs])
                epochs = [r["examples"] / train_size for r in adascale.runs if r.get("examples")]
                steps = [r["steps"] for r in adascale.runs if r.get("steps") is not None]
                row += [
                    fmt(float(np.median(gains))) if gains else "-",
                    f"{np.median(steps):,.0f} ({np.median(epochs):.1f} epochs)" if steps else "-",
                ]
            rows.append(row)
        columns = [
            "batch", "optimizer", "tuned: lr used", "AutoWU: peak lr (median)",
            "AutoWU: switch (fraction of run; why)", "AdaScale: final gain",
            "AdaScale: steps (epochs)",
        ]  # fmt: skip
        return Table(columns, rows)

    def cost(self) -> tuple[Table, dict[str, float]]:
        """Runs and run-seconds per optimizer and batch size, tuned against each adaptive
        schedule, with the totals; and the totals' ratios (adaptive / tuned)."""
        tuned_rows: dict[Key, list[dict]] = defaultdict(list)
        for row in self.part.wanted:
            if row["optimizer"] in self.optimizers:
                tuned_rows[row["optimizer"], row["batch_size"]].append(row)
        adaptive_rows = {
            m: {k: p.runs for k, p in points.items()} for m, points in self.adaptive.items()
        }

        def describe(runs: list[dict]) -> tuple[str, int, float]:
            seconds = sum(r.get("wall_time") or 0.0 for r in runs)
            return (f"{len(runs)} ({seconds:,.0f} s)" if runs else "-"), len(runs), seconds

        totals: dict[str, list[float]] = {m: [0, 0.0] for m in ("tuned", *NAMES)}
        rows = []
        for key in self.keys():
            row = [f"{key[1]:,}", key[0]]
            for method, runs in (
                ("tuned", tuned_rows.get(key, [])),
                *((m, adaptive_rows[m].get(key, [])) for m in NAMES),
            ):
                text, count, seconds = describe(runs)
                if method == "adascale" and key[1] == self.base_batch:
                    text = "0 (the tuned run)"
                row.append(text)
                totals[method][0] += count
                totals[method][1] += seconds
            rows.append(row)
        rows.append(
            ["all", ", ".join(self.optimizers)]
            + [f"{int(n)} ({s:,.0f} s)" for n, s in totals.values()]
        )
        ratios = {}
        for method in NAMES:
            runs_ratio = totals[method][0] / totals["tuned"][0] if totals["tuned"][0] else math.nan
            time_ratio = totals[method][1] / totals["tuned"][1] if totals["tuned"][1] else math.nan
            ratios[method] = (runs_ratio, time_ratio)
        columns = ["batch", "optimizer", "tuned: runs (run-seconds)", *NAMES.values()]
        return Table(columns, rows), ratios


def cost_text(ratios: dict[str, tuple[float, float]]) -> str:
    parts = [
        f"{NAMES[m]} {runs:.0%} of the runs and {seconds:.0%} of the run-seconds"
        for m, (runs, seconds) in ratios.items()
        if not math.isnan(runs)
    ]
    return (
        "**Cost against the tuning** (every grid run and seed of the tuned cells, for the "
        "same optimizers and batch sizes): " + "; ".join(parts) + ". AdaScale also needs the "
        "tuning at its base batch size, counted in the tuned column there."
        if parts
        else ""
    )


def figure(columns: Columns, value: Callable[[Point], float], ylabel: str, log: bool) -> Figure:
    """``value`` vs batch size: tuned (solid), AutoWU (dashed), AdaScale (dotted), one colour
    per optimizer; points where no seed finished or reached the target are left out."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    colors = columns.part.report.colors
    styles = {"tuned": "o-", "autowu": "s--", "adascale": "^:"}
    for optimizer in columns.optimizers:
        color = colors.get(optimizer, "0.3")
        sources = {"tuned": {k: p for k, p in columns.tuned.items() if k[0] == optimizer}}
        sources.update(
            {
                m: {k: p for k, p in pts.items() if k[0] == optimizer}
                for m, pts in columns.adaptive.items()
            }
        )
        for method, points in sources.items():
            b = sorted(k[1] for k in points)
            y = np.array([value(points[optimizer, batch]) for batch in b], dtype=float)
            keep = np.isfinite(y)
            label = f"{optimizer} ({'tuned' if method == 'tuned' else NAMES[method]})"
            ax.plot(np.array(b)[keep], y[keep], styles[method], color=color, label=label)
    if log:
        ax.set_yscale("log")
    batch_size_axis(ax, columns.batch_sizes)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    add_legend(ax, ncols=2)
    return fig


def accuracy_value(point: Point) -> float:
    return math.nan if flag(point) is not None else 100 * point.mean("final_test_accuracy")


def steps_value(point: Point) -> float:
    steps = point.median_to_target()
    return steps if flag(point) is None and math.isfinite(steps) else math.nan


def steps_text(point: Point | None) -> str:
    """Median steps to target over seeds, ``not reached``, or the point's flag."""
    if point is None:
        return ""
    flagged = flag(point)
    if flagged is not None:
        return flagged
    steps = point.median_to_target()
    reached = sum(r.get("steps_to_target") is not None for r in point.runs)
    text = f"{steps:,.0f}" if math.isfinite(steps) else "not reached"
    return text + (
        f" ({reached} of {len(point.runs)} reached)" if reached < len(point.runs) else ""
    )


def steps_ratio(adaptive: Point | None, tuned: Point | None) -> float:
    """Median steps to target of ``adaptive`` over ``tuned``'s (NaN if either never got there)."""
    if adaptive is None or tuned is None:
        return math.nan
    a, t = adaptive.median_to_target(), tuned.median_to_target()
    return a / t if math.isfinite(a) and math.isfinite(t) and t > 0 else math.nan


def steps_versus(adaptive: Point | None, tuned: Point | None) -> str:
    ratio = steps_ratio(adaptive, tuned)
    return "-" if math.isnan(ratio) else f"{ratio:.2f}×"


def accuracy_versus(adaptive: Point | None, tuned: Point | None) -> str:
    return signed(difference(adaptive, tuned))


INTRO = (
    "Beside the tuned cells, {optimizers} ran once per batch size and seed with each adaptive "
    "schedule, untuned: **AutoWU** (`--schedule autowu`: exponential warm-up until a "
    "Gaussian-process test finds the training loss past its minimum, then cosine decay from "
    "the rate at the smoothed minimum; its range is the sweep file's `autowu_min_lr` to "
    "`autowu_max_lr`, the span of the tuning grid) and **AdaScale** (`--scaling adascale`: "
    "the rate tuned at the smallest batch size {base:,}, scaled every step by the gain "
    "measured from the gradient variance across two accumulation micro-batches, with batch "
    "{base:,}'s budget in scale-invariant steps, so it may use more epochs than the tuned "
    "run; at batch {base:,} it is the tuned run). "
)


def verdict(
    columns: Columns,
    large: int,
    compare: Callable[[Point, Point | None], float],
    summary: Callable[[list[float]], str],
    lost: str,
) -> str:
    """Per schedule and optimizer, ``summary`` of ``compare(adaptive, tuned)`` over the batch
    sizes >= ``large`` where the adaptive cell ran (NaN counted as ``lost``)."""
    parts = []
    for method, name in NAMES.items():
        found = []
        for optimizer in columns.optimizers:
            values = [
                compare(point, columns.tuned.get((optimizer, b)))
                for b in columns.batch_sizes
                if b >= large and (point := columns.adaptive[method].get((optimizer, b)))
            ]
            kept = [v for v in values if not math.isnan(v)]
            if values:
                text = f"{optimizer} {summary(kept) if kept else '-'}"
                if len(kept) < len(values):
                    text += f" ({len(values) - len(kept)} of {len(values)} batch sizes {lost})"
                found.append(text)
        if found:
            parts.append(f"{name} {', '.join(found)}")
    return "; ".join(parts)


#: AdaScale keeps the base batch's result when within this many points of its tuned accuracy
KEEP_POINTS = 1.0


def adascale_points(columns: Columns) -> dict[str, list[Point]]:
    """Per optimizer, AdaScale's points above the base batch size, by batch size."""
    return {
        optimizer: [
            point
            for b in columns.batch_sizes
            if b > (columns.base_batch or 0)
            and (point := columns.adaptive["adascale"].get((optimizer, b)))
        ]
        for optimizer in columns.optimizers
    }


def accuracy_base_verdict(columns: Columns) -> str:
    """AdaScale's claim, judged: does it keep the tuned base batch's test accuracy (within
    :data:`KEEP_POINTS`) at each larger batch size?"""
    parts = []
    for optimizer, points in adascale_points(columns).items():
        base = columns.tuned.get((optimizer, columns.base_batch))
        if not points or base is None or flag(base) is not None:
            continue
        cells = []
        for point in points:
            diff = difference(point, base)["diff"]
            if math.isnan(diff):
                cells.append(f"{point.batch_size:,} {flag(point) or '-'}")
                continue
            bad = [s for s in point.statuses if s != "done"]
            note = f", {len(bad)} of {len(point.statuses)} {FLAGS[bad[0]]}" if bad else ""
            cells.append(f"{point.batch_size:,} {diff:+.1f}{note}")
        kept = [
            f"{p.batch_size:,}"
            for p in points
            if all(s == "done" for s in p.statuses) and difference(p, base)["diff"] >= -KEEP_POINTS
        ]
        parts.append(
            f"{optimizer} keeps it at {', '.join(kept) if kept else 'no batch size'} "
            f"({'; '.join(cells)})"
        )
    if not parts:
        return ""
    return (
        f" **AdaScale against the tuned base batch {columns.base_batch:,} (its claim: the "
        f"small-batch accuracy, kept when within {KEEP_POINTS:g} point; test accuracy minus "
        f"the base batch's, in points): {'; '.join(parts)}.**"
    )


def steps_base_verdict(columns: Columns) -> str:
    """AdaScale's claim in a study that stops at a target: the batch sizes above the base
    where every seed reached it."""
    parts = []
    for optimizer, points in adascale_points(columns).items():
        if not points:
            continue
        kept = [
            f"{p.batch_size:,}"
            for p in points
            if p.runs
            and all(r["status"] == "done" and r.get("steps_to_target") is not None for r in p.runs)
        ]
        parts.append(
            f"{optimizer} at {', '.join(kept) if kept else 'none'} of {len(points)} batch sizes"
        )
    if not parts:
        return ""
    return (
        f" **AdaScale against the base batch {columns.base_batch:,} (its claim: the "
        f"small-batch result, here the target), every seed reached the target: "
        f"{'; '.join(parts)}.**"
    )


@dataclass(frozen=True)
class Measure:
    """What a study's adaptive section compares: test accuracy, or steps to target."""

    header: str  # of the tuned column
    text: Callable[[Point | None], str]  # a cell
    versus: Callable[[Point | None, Point | None], str]  # adaptive against tuned, a cell
    compare: Callable[[Point, Point | None], float]  # the same as a number, for the verdict
    summary: Callable[[list[float]], str]  # of the numbers over the large batch sizes
    lost: str  # what a NaN comparison means
    verdict: str  # the sentence, with {large} and {found}
    stem: str  # the figure's
    value: Callable[[Point], float]  # plotted
    label: str  # the figure's y axis
    log: bool
    base_verdict: Callable[[Columns], str]  # AdaScale against the tuned base batch


ACCURACY = Measure(
    "test accuracy (%)", accuracy_text, accuracy_versus,
    lambda a, t: difference(a, t)["diff"], lambda d: f"{np.mean(d):+.1f}",
    "diverged or at chance",
    "**Test accuracy minus the tuned rate's at the same batch size, in points, averaged "
    "over the batch sizes ≥ {large:,}: {found}.**",
    "adaptive_accuracy", accuracy_value, "final test accuracy (%)", False,
    accuracy_base_verdict,
)  # fmt: skip
STEPS = Measure(
    "median steps to target", steps_text, steps_versus, steps_ratio,
    lambda r: f"{math.exp(np.mean(np.log(r))):.2f}×", "not reached",
    "**Steps to the target relative to the tuned rate's (geometric mean over the batch "
    "sizes ≥ {large:,}; 1× is as fast as tuning): {found}.**",
    "adaptive_steps", steps_value, "steps to target (median over seeds)", True,
    steps_base_verdict,
)  # fmt: skip


def adaptive_section(part: PartResults, measure: Measure, large: int) -> Section | None:
    """The study's section on AutoWU and AdaScale: ``measure`` against the tuned rate's,
    what each schedule chose, and the cost; ``None`` before any adaptive run is recorded."""
    if not part.adaptive:
        return None
    columns = Columns(part)
    cost, ratios = columns.cost()
    found = verdict(columns, large, measure.compare, measure.summary, measure.lost)
    optimizers = " and ".join(o.upper() for o in columns.optimizers)
    text = INTRO.format(optimizers=optimizers, base=columns.base_batch)
    text += measure.verdict.format(large=large, found=found) if found else ""
    text += measure.base_verdict(columns)
    text += "\n\n" + cost_text(ratios)
    plot = Plot(
        measure.stem,
        figure(columns, measure.value, measure.label, measure.log),
        f"{measure.label} vs batch size: tuned (solid), AutoWU (dashed), AdaScale (dotted)",
    )
    return Section(
        "Adaptive schedules (AutoWU, AdaScale) against the tuned learning rate",
        text,
        [plot],
        [columns.table(measure.text, measure.versus, measure.header), columns.choices(), cost],
    )
