"""Scaling study: steps to target against batch size, and the critical batch size against B_simple.

SGD, AdamW, LAMB and ALTO on MNIST-1D from batch 32 to 4,096, every run
stopping at its target, each cell's learning rate chosen by the fewest steps
to it (Shallue et al. 2019). The critical batch size where perfect scaling ends
is measured from the steps (:func:`~largebatch.experiments.analysis.critical_batch_size`)
and set next to the gradient noise scale B_simple logged in the same runs, which
McCandlish et al. (2018) predict it to be, to within an order of magnitude.
"""

from __future__ import annotations

import math

import numpy as np

from largebatch.experiments.report import Section, Table, fmt, steps_section, steps_to_target_table
from largebatch.experiments.studies.adaptive import (
    ADAPTIVE,
    QUICK_ADAPTIVE,
    STEPS,
    adaptive_section,
)
from largebatch.experiments.studies.base import Part, Study, StudyContext, Tuned, register
from largebatch.experiments.studies.common import TUNING_TEXT, finite, tuning_table

#: McCandlish et al.: B_crit is predicted by B_simple to within this factor
ORDER_OF_MAGNITUDE = 10.0
#: the batch sizes the adaptive schedules' verdict averages over (as the alto study's)
LARGE = 1024


def scaling_sections(context: StudyContext) -> list[Section]:
    part = context.parts["mnist1d-cnn"]
    if not part.rows:
        return [Section("No results", "No run is recorded yet.")]
    ctx = part.report
    steps = steps_section(ctx)
    critical, _ = steps_to_target_table(ctx)
    rows = []
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
        ratio = estimate / median if estimate and median > 0 else math.nan
        within = "-" if math.isnan(ratio) else (
            "yes" if 1 / ORDER_OF_MAGNITUDE <= ratio <= ORDER_OF_MAGNITUDE else "no"
        )  # fmt: skip
        rows.append(
            [
                series,
                measured.describe(),
                f"≈ {model.b_crit:,.0f}" if model else "-",
                f"{fmt(median)} ({fmt(min(b_simple))} – {fmt(max(b_simple))})" if b_simple else "-",
                fmt(ratio),
                within,
            ]
        )
    table = Table(
        [
            "optimizer",
            "critical batch size (steps)",
            "B_crit (McCandlish fit)",
            "B_simple at the target: median (range)",
            "critical / B_simple",
            "within 10x (McCandlish)",
        ],  # fmt: skip
        rows,
    )
    text = (
        "Every run stops at the target, and each optimizer's learning rate at each batch size "
        "is the one that reached it in the fewest steps with the first seed (Shallue et al.); "
        "the second seed repeats it (steps: median over seeds). B_simple = tr(Σ)/|G|² is the "
        "noise scale logged by every run (moving average at its end, i.e. near the target), "
        "median and range over the runs at the chosen learning rates. McCandlish et al. "
        "predict the critical batch size to be about B_simple (they find it within an order "
        "of magnitude across tasks). Where steps only bracket the critical batch size, the "
        "ratio uses the bracket's geometric middle."
    )
    sections = [
        Section(
            "Steps to target, the critical batch size and B_simple",
            text,
            steps.plots,
            [table, *steps.tables],
        )
    ]
    adaptive = adaptive_section(part, STEPS, LARGE)
    if adaptive is not None:
        sections.append(adaptive)
    tuning = tuning_table(part)
    if tuning is not None:
        sections.append(Section("Learning rates", TUNING_TEXT, tables=[tuning]))
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
