"""Scaling study: steps to target against batch size, and the critical batch size against B_simple.

SGD, AdamW, LAMB and ALTO on MNIST-1D from batch 32 to 4,096, every run
stopping at its target, each cell's learning rate chosen by the fewest steps
to it (Shallue et al. 2019). McCandlish et al.'s (2018) critical batch size B_crit,
fitted to the steps (:func:`~largebatch.experiments.analysis.fit_steps_model`), is set
next to the gradient noise scale B_simple logged in the same runs, which they predict
it to be to within an order of magnitude; the batch size where the steps reach twice
perfect scaling's (:func:`~largebatch.experiments.analysis.critical_batch_size`) is
set beside it, and the momentum SGD arm against the adaptive optimizers (Shallue et al.).
"""

from __future__ import annotations

import math

import numpy as np

from largebatch.experiments.analysis import Point
from largebatch.experiments.report import (
    ReportContext,
    Section,
    Table,
    fmt,
    steps_section,
    steps_to_target_table,
)
from largebatch.experiments.studies.adaptive import (
    ADAPTIVE,
    QUICK_ADAPTIVE,
    STEPS,
    adaptive_section,
)
from largebatch.experiments.studies.base import (
    Part,
    PartResults,
    Study,
    StudyContext,
    Tuned,
    register,
)
from largebatch.experiments.studies.common import finite, tuning_table, tuning_text
from largebatch.optim.registry import optimizer_arguments

#: McCandlish et al.: B_crit is predicted by B_simple to within this factor
ORDER_OF_MAGNITUDE = 10.0
#: the batch sizes the adaptive schedules' verdict averages over (as the alto study's)
LARGE = 1024
#: a measured/perfect-scaling ratio this close (relatively) to the critical factor is flagged
KNIFE_EDGE = 0.05


def reached_text(point: Point) -> str:
    """Median steps to target and ``(reached/seeds)``, e.g. ``"972 (2/2)"``."""
    steps = point.median_to_target()
    reached = sum(
        r["status"] == "done" and r.get("steps_to_target") is not None for r in point.runs
    )
    text = f"{steps:,.0f}" if math.isfinite(steps) else "not reached"
    return f"{text} ({reached}/{len(point.runs)})"


def steps_tables(ctx: ReportContext, critical: dict) -> tuple[Table, Table]:
    """Optimizer x batch size: median steps to target (reached/seeds) with each batch size's
    evaluation interval; and the steps over perfect scaling's (examples over the reference's)."""
    batch_sizes = ctx.batch_sizes
    columns = ["optimizer", *(f"{b:,}" for b in batch_sizes)]
    steps_rows, ratio_rows, intervals = [], [], {}
    for series, pts in ctx.series.items():
        by_batch = {p.batch_size: p for p in pts}
        steps_rows.append(
            [series, *(reached_text(by_batch[b]) if b in by_batch else "-" for b in batch_sizes)]
        )
        ratios = dict(zip(critical[series]["b"], scaling_ratios(critical[series])))
        ratio_rows.append([series, *(ratio_text(ratios.get(b, math.nan)) for b in batch_sizes)])
        for p in pts:
            intervals.setdefault(p.batch_size, {r["config"].get("eval_every") for r in p.runs})
    steps_rows.append(
        ["evaluated every (steps)"]
        + [
            ", ".join(fmt(v) for v in sorted(intervals.get(b, set()) - {None})) or "-"
            for b in batch_sizes
        ]
    )
    return Table(columns, steps_rows), Table(columns, ratio_rows)


def scaling_ratios(measured: dict) -> list[float]:
    """Steps over perfect scaling's, ``S(B) B / (S(B0) B0)``, from the smallest batch size
    that reached the target (as :func:`~largebatch.experiments.analysis.critical_batch_size`);
    NaN below it."""
    pairs = list(zip(measured["b"], measured["steps"]))
    reference = next(((b, s) for b, s in pairs if 0 < s < math.inf), None)
    if reference is None:
        return [math.nan] * len(pairs)
    b0, s0 = reference
    return [s * b / (s0 * b0) if b >= b0 and s > 0 else math.nan for b, s in pairs]


def ratio_text(ratio: float) -> str:
    if math.isnan(ratio):
        return "-"
    return f"{ratio:.3f}×" if math.isfinite(ratio) else "not reached"


def knife_edges(critical: dict) -> list[str]:
    """Where a measured ratio to perfect scaling lies within :data:`KNIFE_EDGE` of the factor:
    the ratio, the median steps and the steps that would make it exactly the factor."""
    found = []
    for series, measured in critical.items():
        factor = measured["critical"].factor
        ratios = scaling_ratios(measured)
        for batch, steps, ratio in zip(measured["b"], measured["steps"], ratios):
            if math.isfinite(ratio) and abs(ratio / factor - 1) < KNIFE_EDGE:
                found.append(
                    f"{series} at {batch:,} ({ratio:.3f}×: {steps:g} steps against "
                    f"{steps * factor / ratio:.1f} for {factor:g}×)"
                )
    return found


def ratio_to(value: float | None, b_simple: float) -> float:
    return value / b_simple if value and b_simple > 0 else math.nan


def within(ratio: float) -> str:
    if math.isnan(ratio):
        return "-"
    return "yes" if 1 / ORDER_OF_MAGNITUDE <= ratio <= ORDER_OF_MAGNITUDE else "no"


def sgd_momentum(part: PartResults) -> float | None:
    """The momentum of the study's ``sgd`` runs (the registry's default unless overridden)."""
    rows = [r for r in part.wanted if r["optimizer"] == "sgd"]
    if not rows:
        return None
    options = {**optimizer_arguments("sgd").defaults, **rows[0]["config"]["optimizer_options"]}
    return options.get("momentum")


def scaling_sections(context: StudyContext) -> list[Section]:
    part = context.parts["mnist1d-cnn"]
    if not part.rows:
        return [Section("No results", "No run is recorded yet.")]
    ctx = part.report
    steps = steps_section(ctx)
    critical, _ = steps_to_target_table(ctx)
    rows, fits, crossings = [], [], []
    for series, pts in ctx.series.items():
        b_simple = finite(
            [r.get("noise_scale") for p in pts for r in p.runs if r["status"] == "done"]
        )
        measured = critical[series]["critical"]
        model = critical[series]["model"]
        median = float(np.median(b_simple)) if b_simple else math.nan
        estimate = measured.estimate
        if estimate is None and measured.low is not None and measured.high is not None:
            estimate = math.sqrt(measured.low * measured.high)  # geometric middle of the bracket
        fit_ratio = ratio_to(model.b_crit if model else None, median)
        crossing_ratio = ratio_to(estimate, median)
        fits.append((series, fit_ratio))
        crossings.append((series, crossing_ratio))
        rows.append(
            [
                series,
                f"≈ {model.b_crit:,.0f}" if model else "-",
                f"{model.s_min:,.0f}" if model else "-",
                measured.describe(),
                f"{fmt(median)} ({fmt(min(b_simple))} – {fmt(max(b_simple))})" if b_simple else "-",
                fmt(fit_ratio),
                within(fit_ratio),
                fmt(crossing_ratio),
                within(crossing_ratio),
            ]
        )
    table = Table(
        [
            "optimizer", "B_crit (McCandlish fit)", "S_min (fit)",
            "critical batch size (2× perfect scaling)", "B_simple at the target: median (range)",
            "B_crit (fit) / B_simple", "within 10× (McCandlish)",
            "2× batch / B_simple", "within 10×",
        ],
        rows,
    )  # fmt: skip
    steps_table, ratio_table = steps_tables(ctx, critical)
    kept = [(s, r) for s, r in fits if not math.isnan(r)]
    inside = [s for s, r in kept if within(r) == "yes"]
    verdict = (
        f"**McCandlish et al.'s B_crit (the fit) is within {ORDER_OF_MAGNITUDE:g}× of the "
        f"median B_simple for {len(inside)} of {len(kept)} optimizers ("
        + ", ".join(f"{s} {r:.2f}" for s, r in kept)
        + "); the batch size where the steps are twice perfect scaling's, against B_simple: "
        + ", ".join(f"{s} {r:.2f}" for s, r in crossings if not math.isnan(r))
        + ".**"
    )
    edges = knife_edges(critical)
    if edges:
        verdict += (
            " The 2× batch size rests on a knife edge where a measured ratio is within "
            f"{KNIFE_EDGE:.0%} of 2: {', '.join(edges)}; steps are resolved to the "
            "evaluation interval (below), so one evaluation more or less moves the crossing "
            "into the neighbouring bracket."
        )
    momentum = sgd_momentum(part)
    if momentum:
        verdict += (
            f" `sgd` here is SGD with momentum {momentum:g}: the study has no plain-SGD arm, "
            "so it compares the adaptive optimizers with momentum SGD."
        )
    text = (
        "Every run stops at the target, and each optimizer's learning rate at each batch size "
        "is the one that reached it in the fewest steps with the first seed (Shallue et al.); "
        "the second seed repeats it (steps: median over seeds). B_simple = tr(Σ)/|G|² is the "
        "noise scale logged by every run (moving average at its end, i.e. near the target), "
        "median and range over the runs at the chosen learning rates. McCandlish et al. "
        "define the critical batch size by the fit `S(B) = S_min (1 + B_crit / B)` and "
        "predict it to be about B_simple (within an order of magnitude across their tasks); "
        "the batch size where the steps reach twice perfect scaling's is shown beside it "
        "(where steps only bracket it, its ratio uses the bracket's geometric middle). " + verdict
    )
    steps_text = (
        "Median steps to the target per optimizer and batch size, with (seeds that reached "
        "it / seeds); a run is evaluated every few steps (last row), so its steps are "
        "resolved to that interval. The second table divides each by perfect scaling's "
        "prediction from the smallest batch size, `S(B) B / (S(B0) B0)`: the examples "
        "needed relative to the smallest batch's; the critical batch size is where it "
        "crosses 2."
    )
    sections = [
        Section(
            "Steps to target, the critical batch size and B_simple", text, steps.plots, [table]
        ),
        Section("Steps to target per batch size", steps_text, tables=[steps_table, ratio_table]),
    ]
    adaptive = adaptive_section(part, STEPS, LARGE)
    if adaptive is not None:
        sections.append(adaptive)
    tuning = tuning_table(part)
    if tuning is not None:
        sections.append(Section("Learning rates", tuning_text(part), tables=[tuning]))
    return sections


SCALING = register(
    Study(
        name="scaling",
        title="steps to target vs batch size, critical batch size vs B_simple (Shallue, McCandlish)",
        question=(
            "How do the steps to a target fall as the batch grows for SGD, AdamW, LAMB and "
            "ALTO, where does perfect scaling end, and does the gradient noise scale B_simple "
            "predict it? And do the adaptive schedules AutoWU and AdaScale, untuned, reach the "
            "target in the tuned rate's steps, at what fraction of the tuning's cost?"
        ),
        parts=(
            Part(
                "mnist1d-cnn",
                "scaling.toml",
                Tuned(min_steps=600, adaptive=ADAPTIVE),
                quick={
                    "task": "mnist1d-mlp",
                    "task_options": {"num_samples": 1000, "hidden": 32},
                    "batch_sizes": [16, 64, 256],
                    "optimizers": ["sgd", "lamb"],
                    "epochs": 2,
                    "evals_per_run": 5,
                    "target": ["accuracy", 0.2],
                    "lr_factors": [0.5, 1.0, 2.0],
                },
                quick_protocol=Tuned(max_extensions=1, min_steps=10, adaptive=QUICK_ADAPTIVE),
            ),
        ),
        sections=scaling_sections,
        minutes=(29, 0.3),
    )
)
