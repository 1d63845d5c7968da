"""The default study (``largebatch demo``): which optimizer keeps accuracy as the batch grows, and up to which batch.

Every optimizer is tuned per batch size (:class:`~largebatch.experiments.studies.base.Tuned`),
large batches get a floor on their number of steps, and each cell's loss of
accuracy against the best small-batch cell is split exactly into what training
failed to fit and what the train-test gap added::

    deficit = ref_test - test = (ref_train - train) + ((train - test) - (ref_train - ref_test))
            =                  under-training      +          generalization gap

so the report can say in words which of the two limits each large-batch cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from largebatch.experiments.analysis import Point
from largebatch.experiments.report import Plot, Section, Table
from largebatch.experiments.studies.base import (
    Part,
    PartResults,
    Study,
    StudyContext,
    Tuned,
    register,
)
from largebatch.experiments.studies.common import (
    FLAGS,
    accuracy_text,
    flag,
    mean_std,
    text_table,
    train_test_figure,
    tuning_table,
    tuning_text,
)

#: a cell keeps accuracy when its mean test accuracy is within this many points of the reference
KEEP_POINTS = 1.0


@dataclass(frozen=True)
class Verdict:
    """What happened to one (optimizer, batch size) cell, against the reference cell."""

    point: Point
    keeps: bool
    deficit: float  # points of test accuracy lost against the reference
    under_training: float  # points of it from fitting the training set less well
    generalization: float  # points of it from a wider train-test gap
    cause: str  # "keeps accuracy", "under-training", "generalization gap" or the flag

    @property
    def words(self) -> str:
        """The verdict as a sentence, for the printed summary."""
        if self.keeps or math.isnan(self.deficit):
            return self.cause
        return (
            f"{self.cause}: loses {self.deficit:.1f} points, {self.under_training:.1f} from "
            f"fitting the training set less well, {self.generalization:.1f} from a wider "
            "train-test gap"
        )


def reference(part: PartResults) -> Point | None:
    """The best cell at the smallest batch size (highest mean test accuracy)."""
    points = [p for p in part.report.points if flag(p) is None]
    if not points:
        return None
    smallest = min(p.batch_size for p in points)
    return max(
        (p for p in points if p.batch_size == smallest), key=lambda p: p.mean("final_test_accuracy")
    )


def verdict(point: Point, ref: Point) -> Verdict:
    """Split ``point``'s loss of test accuracy against ``ref`` into its two causes."""
    flagged = flag(point)
    if flagged is not None:
        return Verdict(point, False, math.nan, math.nan, math.nan, f"{flagged}: no result")
    test, train = (100 * point.mean(k) for k in ("final_test_accuracy", "final_train_accuracy"))
    ref_test, ref_train = (
        100 * ref.mean(k) for k in ("final_test_accuracy", "final_train_accuracy")
    )
    deficit = ref_test - test
    under = ref_train - train
    gap = deficit - under
    if deficit <= KEEP_POINTS:
        return Verdict(point, True, deficit, under, gap, "keeps accuracy")
    cause = "under-training" if under >= gap else "generalization gap"
    return Verdict(point, False, deficit, under, gap, cause)


def keeps_up_to(verdicts: list[Verdict]) -> str:
    """The largest batch size up to which every batch size keeps accuracy."""
    largest = None
    for v in sorted(verdicts, key=lambda v: v.point.batch_size):
        if not v.keeps:
            break
        largest = v.point.batch_size
    return f"{largest:,}" if largest is not None else "none"


def verdicts_by_series(part: PartResults) -> tuple[Point | None, dict[str, list[Verdict]]]:
    ref = reference(part)
    if ref is None:
        return None, {}
    return ref, {s: [verdict(p, ref) for p in pts] for s, pts in part.report.series.items()}


def main_table(part: PartResults) -> tuple[Table, Point | None, dict[str, list[Verdict]]]:
    """Optimizers x batch sizes: test accuracy (training accuracy), and where accuracy holds."""
    ref, verdicts = verdicts_by_series(part)
    batch_sizes = part.report.batch_sizes
    rows = []
    for series, pts in part.report.series.items():
        by_batch = {p.batch_size: p for p in pts}
        cells = []
        for b in batch_sizes:
            p = by_batch.get(b)
            if p is None or flag(p) is not None:
                cells.append(accuracy_text(p))
                continue
            notes = [f"{100 * p.mean('final_train_accuracy'):.1f}"]
            bad = [status for status in p.statuses if status != "done"]
            if bad:
                notes.append(f"{len(bad)} of {len(p.statuses)} {FLAGS[bad[0]]}")
            cells.append(f"{mean_std(p.values('final_test_accuracy'))} ({'; '.join(notes)})")
        rows.append([series, *cells, keeps_up_to(verdicts.get(series, []))])
    columns = ["optimizer", *(f"{b:,}" for b in batch_sizes), "keeps accuracy up to"]
    return Table(columns, rows), ref, verdicts


def demo_sections(context: StudyContext) -> list[Section]:
    part = context.parts["mnist1d-cnn"]
    if not part.rows:
        return [Section("No results", "No run is recorded yet.")]
    table, ref, verdicts = main_table(part)
    budget = part.factory.spec
    ref_text = (
        f"the best small-batch cell, {ref.optimizer} at batch {ref.batch_size:,} "
        f"({100 * ref.mean('final_test_accuracy'):.1f}% test, "
        f"{100 * ref.mean('final_train_accuracy'):.1f}% training accuracy)"
        if ref is not None
        else "no cell finished"
    )
    text = (
        "Final **test accuracy** in % (mean ± std over seeds; training accuracy and flagged "
        "seeds in brackets) "
        f"on `{budget.task}`, each optimizer with its learning rate tuned per batch size on "
        "the validation split and its recommended warm-up and schedule. Budget: "
        f"{budget.epochs:g} epochs, and at least {part.protocol.min_steps} steps for the "
        f"batch sizes where {budget.epochs:g} epochs are fewer, so large batches are not stopped "
        f"before they can fit the data. A cell **keeps accuracy** when it is within {KEEP_POINTS:g} point "
        f"of {ref_text}. Runs whose training loss ended at chance level (no better than "
        "predicting the class frequencies) or diverged are flagged, not averaged."
    )
    sections = [
        Section(
            "As the batch grows, which optimizer keeps accuracy, and up to which batch?",
            text,
            [
                Plot(
                    "demo_accuracy",
                    train_test_figure(part, "Accuracy vs batch size"),
                    "Test (solid) and training (dashed) accuracy vs batch size",
                )
            ],  # fmt: skip
            [table],
        )
    ]
    limit_rows = [
        [
            v.point.series,
            f"{v.point.batch_size:,}",
            f"{v.deficit:.1f}",
            f"{v.under_training:.1f}",
            f"{v.generalization:.1f}",
            v.cause,
        ]
        for vs in verdicts.values()
        for v in vs
        if not v.keeps
    ]
    if limit_rows:
        sections.append(
            Section(
                "What limits the cells that lose accuracy",
                "Each cell's loss of test accuracy against the reference splits exactly into "
                "**under-training** (it fits the training set less well: reference training "
                "accuracy minus its own) and the **generalization gap** (its train-test gap "
                "minus the reference's). The larger share names what limits the cell: more "
                "steps or a better optimizer fix the first; the second is the large-batch "
                "generalization gap of Keskar et al.",
                tables=[
                    Table(
                        [
                            "optimizer",
                            "batch",
                            "points lost",
                            "under-training",
                            "generalization gap",
                            "verdict",
                        ],  # fmt: skip
                        limit_rows,
                    )
                ],
            )
        )
    tuning = tuning_table(part)
    if tuning is not None:
        sections.append(Section("Learning rates", tuning_text(part), tables=[tuning]))
    return sections


def demo_summary(context: StudyContext) -> str:
    part = context.parts["mnist1d-cnn"]
    if not part.rows:
        return "No run is recorded yet."
    table, _, verdicts = main_table(part)
    lines = [text_table(table, "Final test accuracy % (training accuracy) by optimizer and batch")]
    for vs in verdicts.values():
        lines += [
            f"  {v.point.series} at {v.point.batch_size:,}: {v.words}" for v in vs if not v.keeps
        ]
    return "\n".join(lines)


DEMO = register(
    Study(
        name="demo",
        title="which optimizer keeps accuracy as the batch grows",
        question=(
            "As the batch grows from 64 to 4,096 on MNIST-1D, which optimizer keeps its "
            "accuracy, up to which batch, and is a cell that loses it under-trained or "
            "generalizing worse?"
        ),
        parts=(
            Part(
                "mnist1d-cnn",
                "demo.toml",
                Tuned(max_extensions=2, seeds_from=1024, min_steps=300),
                quick={
                    "task": "mnist1d-mlp",
                    "task_options": {"num_samples": 1000, "hidden": 32},
                    "batch_sizes": [16, 128],
                    "optimizers": ["sgd", "lamb"],
                    "epochs": 2,
                    "evals_per_run": 2,
                },
                quick_protocol=Tuned(max_extensions=1, seeds_from=128, min_steps=10),
            ),
        ),
        sections=demo_sections,
        summary=demo_summary,
        minutes=(8, 0.2),
    )
)
