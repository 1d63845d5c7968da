"""Report section of the adaptive learning-rate schedules (AutoWU, AdaScale).

The report imports this module (it is listed in ``report.SECTION_MODULES``).
For every point of a series whose runs use ``schedule = "autowu"`` or
``scaling = "adascale"``, the section draws the training loss and the learning
rate over training from the first run's ``metrics.csv``, marks AutoWU's switch
from warm-up to decay (``result.extra["autowu_switch_step"]``) on both, and
tabulates the switch (step, peak rate, why) and AdaScale's final gain and
scale-invariant progress. It shows nothing when no run is adaptive.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from largebatch.experiments.report import Plot, ReportContext, Section, Table, fmt, register_section


def _adaptive(row: dict[str, Any]) -> bool:
    config = row["config"]
    return config.get("schedule") == "autowu" or config.get("scaling") == "adascale"


def switch_epoch(curves: dict[str, np.ndarray], step: int) -> float:
    """The epoch of ``step``, interpolated between the logged rows."""
    return float(np.interp(step, curves["step"], curves["epoch"]))


@register_section("adaptive-schedules", order=55)
def adaptive_schedules_section(ctx: ReportContext) -> Section | None:
    """Loss and learning rate over training of the adaptive runs, AutoWU's switch marked."""
    shown = []
    for p in ctx.points:
        if p.runs and _adaptive(p.runs[0]):
            curves = ctx.curves(p.runs[0])
            if {"epoch", "lr", "train_loss"} <= curves.keys():
                shown.append((p, curves))
    if not shown:
        return None
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, lr_ax = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    batch_sizes = sorted({p.batch_size for p, _ in shown})
    rows = []
    for p, curves in shown:
        color = ctx.colors[p.series]
        style = styles[batch_sizes.index(p.batch_size) % len(styles)]
        loss_ax.plot(curves["epoch"], curves["train_loss"], style, color=color, linewidth=1.3)
        lr_ax.plot(curves["epoch"], curves["lr"], style, color=color, linewidth=1.3)
        extra = p.runs[0].get("extra", {})
        switch = extra.get("autowu_switch_step")
        if switch is not None:
            epoch = switch_epoch(curves, switch)
            for ax in (loss_ax, lr_ax):
                ax.axvline(epoch, color=color, linestyle=":", linewidth=1.2)
            lr_ax.plot([epoch], [extra["autowu_peak_lr"]], "v", color=color, markersize=7)
        rows.append(
            [
                p.series,
                f"{p.batch_size:,}",
                fmt(switch) if switch is not None else "-",
                fmt(switch_epoch(curves, switch), 3) if switch is not None else "-",
                fmt(extra.get("autowu_peak_lr")),
                extra.get("autowu_switch_reason") or "-",
                fmt(extra.get("adascale_gain")),
                fmt(extra.get("adascale_scale")),
                fmt(extra.get("scale_invariant_steps")),
                fmt(p.runs[0].get("steps")),
            ]
        )
    initial = [c["train_loss"][0] for _, c in shown if math.isfinite(c["train_loss"][0])]
    loss_ax.set_yscale("log")
    if initial:
        loss_ax.set_ylim(top=3 * max(initial))  # a loss blowing up leaves the panel
    lr_ax.set_yscale("log")
    for ax, label in ((loss_ax, "training loss"), (lr_ax, "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], color=ctx.colors[s], label=s)
        for s in dict.fromkeys(p.series for p, _ in shown)
    ]
    handles += [
        Line2D([], [], color="0.3", linestyle=styles[i % len(styles)], label=f"batch {b:,}")
        for i, b in enumerate(batch_sizes)
    ]
    handles.append(
        Line2D([], [], color="0.3", linestyle=":", marker="v", label="AutoWU switch, peak")
    )
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=9)
    text = (
        "Runs whose learning rate adapts during training (first seed of each point). "
        "**AutoWU** (Kim et al. 2021) raises the rate exponentially until a Gaussian-process "
        "test of the training loss finds its minimum passed three epochs in a row; the dotted "
        "line marks that switch and the triangle the peak rate it chose (the rate at the "
        "smoothed minimum), from which the rate decays to zero. **AdaScale** (Johnson et al. "
        "2020) multiplies the base rate by the gain measured from the gradient variance and "
        "runs until its scale-invariant progress covers the base schedule, so its number of "
        "steps varies. The loss and rate are those logged at each evaluation."
    )
    columns = [
        "series", "batch", "switch step", "switch epoch", "peak lr", "switched by",
        "final gain", "scale S", "scale-invariant steps", "steps",
    ]  # fmt: skip
    return Section(
        "Adaptive learning-rate schedules",
        text,
        [Plot("adaptive_schedules", fig, "Training loss and learning rate of the adaptive runs")],
        [Table(columns, rows)],
    )
