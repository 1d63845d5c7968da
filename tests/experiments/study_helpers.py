"""A tiny study for the study-machinery tests, runnable in a subprocess that a test kills.

``python study_helpers.py DIR`` runs :data:`TINY_STUDY` into ``DIR`` (one job, no progress
bar). Its runs sleep a little per step (``slow_task``) so that a kill lands mid-study.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from torch import nn

from largebatch.experiments.report import Section
from largebatch.experiments.studies.base import Part, Study, Tuned
from largebatch.tasks import Task, get_task

TINY_OPTIONS = {
    "num_train": 300, "num_test": 100, "input_dim": 8, "num_classes": 4,
    "teacher_hidden": 8, "student_hidden": 16,
}  # fmt: skip


class Sleepy(nn.Module):
    """Wraps a model; sleeps ``delay`` seconds per training forward pass."""

    def __init__(self, model: nn.Module, delay: float) -> None:
        super().__init__()
        self.model, self.delay = model, delay

    def forward(self, x):
        if self.training and self.delay:
            time.sleep(self.delay)
        return self.model(x)


def slow_task(delay: float = 0.0) -> Task:
    """The tiny teacher-student task, ``delay`` seconds slower per training step."""
    task = get_task("teacher-student", **TINY_OPTIONS)
    return replace(task, name="study_helpers:slow_task",
                   build_model=lambda: Sleepy(task.build_model(), delay))  # fmt: skip


def _sections(context) -> list[Section]:
    rows = sum(len(part.rows) for part in context.parts.values())
    return [Section("Tiny", f"{rows} runs")]


def tiny_study(sweep_file: str, delay: float = 0.0) -> Study:
    """A one-part study of ``sweep_file`` (a path) with per-cell tuning and seeds."""
    return Study(
        name="tiny",
        title="tiny",
        question="Does the machinery work?",
        parts=(Part("part", sweep_file, Tuned(max_extensions=2)),),
        sections=_sections,
        minutes=(0.1, 0.1),
    )


SWEEP_TOML = """
task = "study_helpers:slow_task"
batch_sizes = [16, 64]
optimizers = ["sgd"]
seeds = [0, 1]
epochs = 2
evals_per_run = 2
lr_factors = [0.5, 1.0, 2.0]

[task_options]
delay = {delay}
"""


if __name__ == "__main__":
    from largebatch.experiments.studies.base import run_study

    directory, sweep_file, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    run_study(tiny_study(sweep_file, delay), directory, jobs=1, progress=False)
