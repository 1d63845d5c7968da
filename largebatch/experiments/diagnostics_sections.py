"""Report sections of the diagnostics, plugged into :mod:`largebatch.experiments.report`.

The report imports this module (it is listed in ``report.SECTION_MODULES``),
which registers three sections; each shows nothing when its data is absent:

* sharpness, top Hessian eigenvalue and trace vs batch size: the columns
  ``largebatch sweep --diagnose`` adds to the results database;
* the loss and accuracy along the line between each optimizer's smallest- and
  largest-batch solutions (``DIR/interpolation.json``, also from ``--diagnose``);
* the gradient noise scale B_simple over training (``metrics.csv`` of runs that
  logged it) next to the critical batch size measured from steps-to-target.
"""

from __future__ import annotations

import json
import math
import re

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from largebatch.experiments.analysis import CriticalBatch
from largebatch.experiments.diagnose import INTERPOLATION_FILE
from largebatch.experiments.plots import interpolation_figure, log_axis
from largebatch.experiments.report import (
    Plot,
    ReportContext,
    Section,
    Table,
    add_legend,
    batch_size_axis,
    fmt,
    register_section,
    steps_to_target_table,
)

#: results-database column -> axis label
CURVATURE_COLUMNS = {
    "sharpness": "ε-sharpness (ε = 1e-3, full space)",
    "top_eigenvalue": "top Hessian eigenvalue",
    "hessian_trace": "Hessian trace",
}


@register_section("sharpness", order=35)
def sharpness_section(ctx: ReportContext) -> Section | None:
    """Sharpness, top eigenvalue and trace of the final weights vs batch size, per optimizer."""
    columns = [c for c in CURVATURE_COLUMNS if any(row.get(c) is not None for row in ctx.rows)]
    if not columns:
        return None
    fig = Figure(figsize=(4.3 * len(columns), 3.9), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, column in zip(axes, columns):
        positive = True
        for series, pts in ctx.series.items():
            b = np.array([p.batch_size for p in pts])
            mean = np.array([p.mean(column) for p in pts])
            ax.plot(b, mean, "o-", color=ctx.colors[series], label=series)
            if any(len(p.values(column)) > 1 for p in pts):
                low, high = zip(*(p.spread(column) for p in pts))
                ax.fill_between(b, low, high, color=ctx.colors[series], alpha=0.2, linewidth=0)
            positive &= bool(np.all(mean[np.isfinite(mean)] > 0))
        if positive:
            log_axis(ax)
        batch_size_axis(ax, ctx.batch_sizes)
        ax.set_ylabel(CURVATURE_COLUMNS[column])
        ax.grid(True, which="both", alpha=0.3)
    add_legend(axes[0], loc="best")
    fig.suptitle("Flatness of the final weights vs batch size", fontsize=11)
    rows = [
        [series, f"{p.batch_size:,}", *(fmt(p.mean(c)) for c in columns)]
        for series, pts in ctx.series.items()
        for p in pts
    ]
    text = (
        "Measured by `largebatch sweep --diagnose` on each run's final weights (the learning "
        "rate selected on validation; mean over seeds, shaded: min-max), on a fixed, seeded "
        "subset of the training data, in eval mode; the settings are in each run's "
        "`diagnostics.json`. Keskar et al.'s ε-sharpness is the largest relative rise of the "
        "training loss, in percent, when every weight may move by ε times its size; it tracks "
        "the top of the Hessian spectrum. Sharpness growing with the batch is Keskar et al.'s "
        "sharp-minimum explanation of the generalization gap; compare the top eigenvalue with "
        "2 / learning rate, the stability limit of gradient descent."
    )
    table = Table(["optimizer", "batch", *(CURVATURE_COLUMNS[c] for c in columns)], rows)
    return Section(
        "Sharpness and curvature vs batch size",
        text,
        [Plot("sharpness", fig, "Sharpness, top Hessian eigenvalue and trace vs batch size")],
        [table],
    )


@register_section("interpolation", order=36)
def interpolation_section(ctx: ReportContext) -> Section | None:
    """Loss and accuracy between the smallest- and the largest-batch solution of each optimizer."""
    try:
        saved = json.loads((ctx.sweep_dir / INTERPOLATION_FILE).read_text())
    except (OSError, ValueError):
        return None
    entries = {series: saved[series] for series in ctx.series if series in saved}
    if not entries:
        return None
    plots = []
    for series, entry in entries.items():
        small, large = entry["small"]["batch_size"], entry["large"]["batch_size"]
        figure = interpolation_figure(
            entry, f"A: batch {small:,}", f"B: batch {large:,}", title=series
        )
        stem = "interpolation_" + re.sub(r"[^\w.-]+", "_", series)
        plots.append(Plot(stem, figure, f"{series}: batch {small:,} (A) to batch {large:,} (B)"))
    text = (
        "Loss and accuracy of the weights `(1 − α) A + α B` between each optimizer's "
        "smallest-batch solution A (α = 0) and largest-batch solution B (α = 1), on a fixed "
        "training subset (solid) and test subset (dashed), for α from −1 to 2 (Keskar et al., "
        "Fig. 3). A sharp minimum shows as a steep rise of the loss next to its end; a barrier "
        "between the ends means the two solutions lie in different basins. Batch-norm running "
        "statistics are interpolated with the weights."
    )
    return Section("Interpolation from small- to large-batch solution", text, plots)


@register_section("noise-scale", order=45)
def noise_scale_section(ctx: ReportContext) -> Section | None:
    """B_simple over training per optimizer, next to the measured critical batch size."""
    logged = {}
    for series, pts in ctx.series.items():
        for p in pts:
            curves = ctx.curves(p.runs[0]) if p.runs else {}
            values = curves.get("noise_scale_ema", np.array([]))
            if np.isfinite(values).any() and "epoch" in curves:
                logged.setdefault(series, []).append((p, curves))
    if not logged:
        return None
    critical, _ = steps_to_target_table(ctx)
    ncols = min(3, len(logged))
    nrows = math.ceil(len(logged) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colormap = matplotlib.colormaps["viridis"]
    shades = np.log2(ctx.batch_sizes)
    span = max(shades.max() - shades.min(), 1.0)

    def color(batch_size: int):
        return colormap(0.9 * (math.log2(batch_size) - shades.min()) / span)

    rows, marks = [], set()
    for ax, (series, runs) in zip(axes.flat, logged.items()):
        measured = critical[series]["critical"]
        for p, curves in runs:
            ema = curves["noise_scale_ema"]
            keep = np.isfinite(ema)
            ax.plot(curves["epoch"][keep], ema[keep], color=color(p.batch_size), linewidth=1.4)
            interval = curves["noise_scale"][np.isfinite(curves["noise_scale"])]
            median = float(np.median(interval)) if interval.size else math.nan
            final = p.mean("noise_scale")
            rows.append([series, f"{p.batch_size:,}", fmt(median), fmt(final), measured.describe()])
        log_axis(ax)
        marks.add(_critical_band(ax, measured))
        ax.set_title(series, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("B_simple (moving average)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(logged) :]:
        ax.axis("off")
    shown = sorted({p.batch_size for runs in logged.values() for p, _ in runs})
    handles = [Line2D([], [], color=color(b), label=f"batch {b:,}") for b in shown]
    if "line" in marks:
        handles.append(
            Line2D([], [], color="0.2", linestyle="--", label="critical batch size (measured)")
        )
    if "band" in marks:
        handles.append(Patch(color="0.2", alpha=0.12, label="critical batch size (bracket)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=9)
    text = (
        "The simple gradient noise scale `B_simple = tr(Σ) / |G|²` (McCandlish et al. 2018), "
        "logged during training from the two gradients each step computes anyway (per-process "
        "and all-reduced under data parallelism, or first micro-batch and accumulated batch "
        "with gradient accumulation); moving average over about the last 100 measurements "
        "(every 10th step by default). McCandlish et al. "
        "predict the critical batch size to be about B_simple averaged over training; the "
        "dashed line (or shaded bracket) is the critical batch size measured from "
        "steps-to-target above. B_simple usually grows as the loss falls, so larger batches "
        "become efficient later in training. Runs without data parallelism or gradient "
        "accumulation do not log it (set `accumulation_steps = 2` in the sweep)."
    )
    columns = [
        "optimizer", "batch", "B_simple, median over training", "B_simple at the end",
        "critical batch size (steps-to-target)",
    ]  # fmt: skip
    return Section(
        "Gradient noise scale and the critical batch size",
        text,
        [Plot("noise_scale", fig, "B_simple over training and the measured critical batch size")],
        [Table(columns, rows)],
    )


def _critical_band(ax: Axes, critical: CriticalBatch) -> str | None:
    """A dashed line at the measured critical batch size ("line"), or a shaded bracket ("band")."""
    if critical.estimate is not None:
        ax.axhline(critical.estimate, color="0.2", linestyle="--", linewidth=1.2)
        return "line"
    if critical.low is None:
        return None
    top = critical.high if critical.high is not None else max(ax.get_ylim()[1], 4 * critical.low)
    ax.axhspan(critical.low, top, color="0.2", alpha=0.12, linewidth=0)
    return "band"
