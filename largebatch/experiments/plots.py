"""Figures of diagnostics results (matplotlib, no pyplot state): kept apart from the computations."""

from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter


class PlainLogFormatter(LogFormatter):
    """Labels the ticks :class:`LogFormatter` would label, as plain numbers (0.2, 30, 1e+04)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def log_axis(ax: Axes) -> None:
    """Log-scale y axis labelled with plain numbers rather than powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    # minor ticks are labelled only when the axis spans less than two decades
    ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


#: split -> (line style, colour)
SPLIT_STYLES = {"train": ("-", "C0"), "val": (":", "C2"), "test": ("--", "C1")}


def interpolation_figure(
    result: dict[str, Any], label_a: str, label_b: str, title: str | None = None
) -> Figure:
    """Loss (log scale) and each metric along ``(1 - a) x_A + a x_B``, one line per split.

    ``result`` is :meth:`InterpolationResult.to_dict` output. Dotted vertical lines
    mark the two solutions, labelled ``label_a`` (a = 0) and ``label_b`` (a = 1).
    """
    alphas = result["alphas"]
    curves = result["curves"]
    metrics = list(next(iter(curves.values())))
    fig = Figure(figsize=(4.6 * len(metrics), 3.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        percent = metric == "accuracy"
        for split, values in curves.items():
            ys = [100 * v for v in values[metric]] if percent else values[metric]
            style, color = SPLIT_STYLES.get(split, ("-.", "C3"))
            ax.plot(alphas, ys, style, color=color, linewidth=1.6, label=split)
        if metric == "loss":
            log_axis(ax)
        for alpha, label in ((0.0, label_a), (1.0, label_b)):
            ax.axvline(alpha, color="0.4", linestyle=":", linewidth=1)
            ax.annotate(
                label, (alpha, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=9, color="0.25",
            )  # fmt: skip
        ax.set_xlabel("α  (weights (1 − α)·A + α·B)")
        ax.set_ylabel(f"{metric} (%)" if percent else metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9, framealpha=0.9, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
