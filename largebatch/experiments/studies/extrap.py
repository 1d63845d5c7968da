"""EXTRAP study: up to which batch does each method keep the small-batch accuracy (Lin et al., ICML 2020)?

Mini-batch SGD, LARS, EXTRAP-SGD and SAM on MNIST-1D as the batch grows, each
cell tuned on the validation split, three seeds. EXTRAP-SGD and SAM compute two
gradients per step, so they run twice: with the same number of steps as SGD
(twice its gradient evaluations) and with half as many (equal gradient
evaluations). The section gives, per method and comparison, the largest batch
whose mean test accuracy stays within one point of mini-batch SGD's at the
smallest batch.
"""

from __future__ import annotations

from largebatch.experiments.analysis import Point
from largebatch.experiments.report import Plot, Section, Table
from largebatch.experiments.studies.base import Part, Study, StudyContext, Tuned, register
from largebatch.experiments.studies.common import (
    accuracy_table,
    flag,
    train_test_figure,
    tuning_table,
    tuning_text,
)

#: a batch size keeps accuracy when its mean test accuracy is within this many points
KEEP_POINTS = 1.0
BASELINE = "sgd"

QUICK = {
    "task": "mnist1d-mlp",
    "task_options": {"num_samples": 1000, "hidden": 32},
    "batch_sizes": [16, 128],
    "seeds": [0, 1],
    "evals_per_run": 2,
    "lr_factors": [0.5, 1.0, 2.0],
}


def largest_kept(points: list[Point], baseline: float) -> str:
    """The largest batch size up to which every batch size is within KEEP_POINTS of ``baseline``."""
    largest = None
    for p in sorted(points, key=lambda p: p.batch_size):
        if flag(p) is not None or 100 * p.mean("final_test_accuracy") < baseline - KEEP_POINTS:
            break
        largest = p.batch_size
    return f"{largest:,}" if largest is not None else "none"


def extrap_sections(context: StudyContext) -> list[Section]:
    steps, grads = context.parts["equal-steps"], context.parts["equal-gradients"]
    if not steps.rows:
        return [Section("No results", "No run is recorded yet.")]
    smallest = min(steps.report.batch_sizes)
    base = next(
        (p for p in steps.report.points if p.optimizer == BASELINE and p.batch_size == smallest),
        None,
    )
    if base is None or flag(base) is not None:
        return [Section("No baseline", f"Mini-batch SGD at batch {smallest:,} has no result.")]
    baseline = 100 * base.mean("final_test_accuracy")
    rows = []
    for label, part in (("equal steps", steps), ("equal gradient evaluations", grads)):
        for series, pts in part.report.series.items():
            evaluations = 2 if series in ("extrap-sgd", "sam") else 1
            epochs = part.factory.spec.epochs
            comparison = "both" if evaluations == 1 else label
            if evaluations == 1 and part is grads:
                continue
            rows.append(
                [
                    series,
                    comparison,
                    f"{epochs:g}",
                    f"{evaluations * epochs:g}",
                    largest_kept(pts, baseline),
                ]  # fmt: skip
            )
    table = Table(
        [
            "method",
            "comparison",
            "epochs (steps)",
            "gradient evaluations (in epochs)",
            f"largest batch within {KEEP_POINTS:g} point of SGD at {smallest:,}",
        ],  # fmt: skip
        rows,
    )
    text = (
        f"Mini-batch SGD at batch {smallest:,} reaches {baseline:.1f}% test accuracy (mean over "
        f"seeds); the table gives, per method, the largest batch size up to which every batch "
        f"size stays within {KEEP_POINTS:g} point of it. **Equal steps**: every method runs the "
        "same number of epochs of steps, so EXTRAP-SGD and SAM (two gradients per step) compute "
        "twice as many gradients. **Equal gradient evaluations**: they run half the epochs. "
        "Lin et al. claim that extrapolation keeps accuracy at larger batches than mini-batch "
        "SGD and LARS; their tables were not available to us, so no paper number is put next "
        "to ours (see docs/RESULTS.md)."
    )
    sections = [
        Section(
            "Up to which batch does each method keep the small-batch accuracy?",
            text,
            [
                Plot(
                    "extrap_equal_steps",
                    train_test_figure(steps, "Equal steps"),
                    "Test (solid) and training (dashed) accuracy vs batch size, equal steps",
                ),
                Plot(
                    "extrap_equal_gradients",
                    train_test_figure(grads, "Equal gradient evaluations"),
                    "EXTRAP-SGD and SAM with half the epochs (equal gradient evaluations)",
                ),
            ],  # fmt: skip
            [
                table,
                accuracy_table(steps, "equal steps"),
                accuracy_table(grads, "equal gradients"),
            ],
        )
    ]
    for part in (steps, grads):
        tuning = tuning_table(part)
        if tuning is not None:
            sections.append(
                Section(f"Learning rates ({part.part.name})", tuning_text(part), tables=[tuning])
            )
    return sections


EXTRAP = register(
    Study(
        name="extrap",
        title="EXTRAP-SGD, SAM, LARS and SGD as the batch grows (Lin et al. 2020)",
        question=(
            "Up to which batch size does each of mini-batch SGD, LARS, EXTRAP-SGD and SAM keep "
            "the small-batch accuracy, at equal steps and at equal gradient evaluations?"
        ),
        parts=(
            Part(
                "equal-steps",
                "extrap-equal-steps.toml",
                Tuned(),
                quick={**QUICK, "epochs": 2},
                quick_protocol=Tuned(max_extensions=1),
            ),
            Part(
                "equal-gradients",
                "extrap-equal-gradients.toml",
                Tuned(),
                quick={**QUICK, "epochs": 1},
                quick_protocol=Tuned(max_extensions=1),
            ),
        ),
        sections=extrap_sections,
        minutes=(8, 0.5),
    )
)
