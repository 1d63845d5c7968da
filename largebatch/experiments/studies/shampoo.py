"""Shampoo study: how many fewer steps than AdamW does Shampoo need to reach a target (Anil et al. 2020)?

AdamW and Shampoo (Adam grafting) on a small transformer (modular addition)
and on the MNIST-1D CNN, each run stopping at its target, learning rates chosen
by the fewest steps to it (Shallue et al.'s criterion), three seeds. The section
gives the steps-to-target ratio and the measured time per step next to the
paper's numbers.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from largebatch.experiments.analysis import Point
from largebatch.experiments.report import Plot, Section, Table, fmt
from largebatch.experiments.studies.base import Part, Study, StudyContext, Tuned, register
from largebatch.experiments.studies.common import (
    flag,
    mean_std,
    seconds_per_step,
    tuning_table,
    tuning_text,
)

#: Anil et al.'s steps-to-result ratios, baseline / Shampoo
PAPER = [
    ("Transformer (93.3M), WMT'14 en-fr, vs Adam", "1.95x fewer steps", 1.95),
    ("ResNet-50, ImageNet, batch 32K, vs LARS", "1,729 vs 2,512 steps", 2512 / 1729),
]

QUICK_PROTOCOL = Tuned(max_extensions=1)


def reached(point: Point) -> np.ndarray:
    """Steps to target of the seeds that reached it."""
    return np.array(
        [r["steps_to_target"] for r in point.runs
         if r["status"] == "done" and r.get("steps_to_target") is not None],
        dtype=float,
    )  # fmt: skip


def steps_text(point: Point | None) -> str:
    if point is None:
        return "-"
    if flag(point) is not None:
        return flag(point)
    steps = reached(point)
    text = mean_std(steps, scale=1.0, digits=0)
    if steps.size < len(point.runs):
        text += f" ({len(point.runs) - steps.size} of {len(point.runs)} never reached)"
    return text


def target_text(target: tuple[str, float] | None) -> str:
    """``"val accuracy ≥ 0.95"`` / ``"train accuracy ≥ 0.95"`` for a sweep's target."""
    if target is None:
        return "the task's"
    split, _, metric = target[0].partition("_")
    if split not in ("train", "val", "test") or not metric:
        split, metric = "val", target[0]
    return f"{split} {metric} {'≤' if metric == 'loss' else '≥'} {target[1]:g}"


def curves_figure(context: StudyContext) -> Figure | None:
    """The target metric over steps at the chosen learning rates, one panel per task."""
    parts = [part for part in context.parts.values() if part.rows]
    if not parts:
        return None
    fig = Figure(figsize=(5.2 * len(parts), 3.8), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, part in zip(axes, parts):
        target = part.factory.spec.target
        split, _, metric = target[0].partition("_")
        column = target[0] if metric else f"val_{target[0]}"
        for point in part.report.points:
            color = part.report.colors[point.series]
            for i, row in enumerate(point.runs):
                curves = part.report.curves(row)
                if column in curves:
                    label = f"{point.series} (lr {fmt(point.lr)})" if i == 0 else None
                    ax.plot(curves["step"], 100 * curves[column], color=color, alpha=0.8,
                            linewidth=1.2, label=label)  # fmt: skip
        ax.axhline(100 * target[1], color="0.4", linestyle=":", linewidth=1)
        ax.set_title(f"{part.factory.spec.task}: {target_text(target)}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{column.replace('_', ' ')} (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9, loc="lower right")
    return fig


def shampoo_sections(context: StudyContext) -> list[Section]:
    rows, ratios = [], {}
    for name, part in context.parts.items():
        if not part.rows:
            continue
        points = {p.optimizer: p for p in part.report.points}
        adamw, shampoo = points.get("adamw"), points.get("shampoo")
        steps = {k: reached(p) if p is not None else np.array([]) for k, p in points.items()}
        ratio = (
            steps["adamw"].mean() / steps["shampoo"].mean()
            if steps.get("adamw", np.array([])).size and steps.get("shampoo", np.array([])).size
            else math.nan
        )
        ratios[name] = ratio
        time_ratio = (
            seconds_per_step(shampoo) / seconds_per_step(adamw)
            if adamw is not None and shampoo is not None
            else math.nan
        )
        target = part.factory.spec.target
        rows.append(
            [
                f"{part.factory.spec.task}, batch {part.report.batch_sizes[0]:,}",
                target_text(target),
                steps_text(adamw),
                steps_text(shampoo),
                f"{ratio:.2f}x" if not math.isnan(ratio) else "-",
                f"{time_ratio:.2f}x" if not math.isnan(time_ratio) else "-",
            ]
        )
    if not rows:
        return [Section("No results", "No run is recorded yet.")]
    table = Table(
        [
            "task",
            "target",
            "AdamW steps",
            "Shampoo steps",
            "AdamW / Shampoo steps",
            "Shampoo / AdamW time per step",
        ],  # fmt: skip
        rows,
    )
    paper = Table(
        ["paper setting (Anil et al.)", "reported", "baseline / Shampoo steps"],
        [[name, reported, f"{r:.2f}x"] for name, reported, r in PAPER],
    )
    ours = ", ".join(f"{n}: {fmt(r)}x" for n, r in ratios.items())
    text = (
        "Steps to first reach the target (mean ± std over the seeds that reached it), each "
        "optimizer at the learning rate that reached it in the fewest steps with the first "
        "seed. On modular addition the target is training accuracy: with half of the pairs "
        "held out, held-out accuracy comes only with grokking, long after the training set is "
        "fit, which measures regularisation rather than optimization speed. Time per step is the median of wall time / steps over the "
        "runs (CPU, one thread per run; Shampoo's inverse roots every 20 steps). "
        f"**Steps ratio AdamW / Shampoo: {ours}**; Anil et al. report about 1.95x on a "
        "Transformer."
    )
    figure = curves_figure(context)
    plots = [Plot("shampoo_curves", figure, "The target metric over steps, every seed at the "
                  "chosen learning rate (dotted: the target)")] if figure else []  # fmt: skip
    sections = [Section("How many fewer steps does Shampoo need?", text, plots, [table, paper])]
    for part in context.parts.values():
        tuning = tuning_table(part)
        if tuning is not None and part.rows:
            sections.append(
                Section(f"Learning rates ({part.part.name})", tuning_text(part), tables=[tuning])
            )
    return sections


SHAMPOO = register(
    Study(
        name="shampoo",
        title="Shampoo against AdamW: steps to target (Anil et al. 2020)",
        question=(
            "How many fewer steps than AdamW does Shampoo need to reach a target accuracy on a "
            "small transformer and on a small CNN, with both learning rates tuned?"
        ),
        parts=(
            Part(
                "modadd-transformer",
                "shampoo-modadd.toml",
                Tuned(),
                quick={
                    "task_options": {"modulus": 11, "d_model": 16, "n_heads": 2},
                    "batch_sizes": [32],
                    "steps": 40,
                    "seeds": [0, 1],
                    "evals_per_run": 8,
                    "target": ["train_accuracy", 0.3],
                    "lrs": [0.004, 0.016, 0.064],
                },
                quick_protocol=QUICK_PROTOCOL,
            ),
            Part(
                "mnist1d-cnn",
                "shampoo-mnist1d.toml",
                Tuned(),
                quick={
                    "task": "mnist1d-mlp",
                    "task_options": {"num_samples": 1000, "hidden": 32},
                    "batch_sizes": [64],
                    "steps": 30,
                    "seeds": [0, 1],
                    "evals_per_run": 5,
                    "target": ["accuracy", 0.2],
                    "lrs": [0.002, 0.008, 0.032],
                },
                quick_protocol=QUICK_PROTOCOL,
            ),
        ),
        sections=shampoo_sections,
        minutes=(4, 0.3),
    )
)
