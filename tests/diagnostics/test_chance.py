"""Chance-level detection: the closed form of the chance loss, the decision rule, and runs."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

from largebatch.diagnostics.chance import (
    ACCURACY_MARGIN,
    LOSS_TOLERANCE,
    WORSE_THAN_CHANCE,
    ChanceLevel,
    chance_level,
)
from largebatch.tasks import Task, get_task
from largebatch.train import RunConfig, train

TINY = {
    "num_train": 400, "num_test": 100, "input_dim": 8, "num_classes": 4,
    "teacher_hidden": 8, "student_hidden": 16,
}  # fmt: skip


def _task(targets: torch.Tensor, loss_fn=F.cross_entropy) -> Task:
    data = TensorDataset(torch.zeros(len(targets), 2), targets)
    return Task("t", data, data, lambda: torch.nn.Linear(2, 3), loss_fn)


def test_chance_loss_is_the_entropy_of_the_class_frequencies():
    """[0.5, 0.25, 0.25] -> 1.5 ln 2 (scipy's entropy), majority share 0.5; ten balanced -> ln 10."""
    level = chance_level(_task(torch.tensor([0, 0, 1, 2])))
    assert level.loss == pytest.approx(scipy.stats.entropy([2, 1, 1]), rel=1e-12)
    assert level.loss == pytest.approx(1.5 * math.log(2), rel=1e-12)
    assert level.accuracy == 0.5
    assert chance_level(_task(torch.arange(50) % 10)).loss == pytest.approx(math.log(10))


def test_chance_loss_is_what_the_best_constant_prediction_scores():
    """Logits = log class frequencies, the same for every input, give exactly the chance loss;
    any other constant prediction scores worse."""
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    level = chance_level(_task(targets))
    frequencies = torch.bincount(targets).double() / len(targets)
    constant = frequencies.log().expand(len(targets), 3)
    assert F.cross_entropy(constant, targets).item() == pytest.approx(level.loss, rel=1e-12)
    uniform = torch.zeros(len(targets), 3, dtype=torch.double)
    assert F.cross_entropy(uniform, targets).item() > level.loss  # negative control


def test_subsets_are_read_through_and_other_tasks_have_no_chance_level():
    targets = torch.tensor([0, 1, 1, 1])
    data = TensorDataset(torch.zeros(4, 2), targets)
    subset_task = Task("t", Subset(data, [1, 2, 3]), data, lambda: None, F.cross_entropy)
    assert chance_level(subset_task) == ChanceLevel(loss=0.0, accuracy=1.0)
    assert chance_level(_task(targets, loss_fn=F.nll_loss)) is None  # not plain cross-entropy
    regression = Task("r", TensorDataset(torch.zeros(4, 2), torch.zeros(4)), data, lambda: None,
                      F.cross_entropy)  # fmt: skip
    assert chance_level(regression) is None


@pytest.mark.parametrize(
    ("loss", "accuracy", "flagged"),
    [
        (math.log(10), 0.10, True),  # exactly chance
        ((1 - LOSS_TOLERANCE / 2) * math.log(10), 0.10 + ACCURACY_MARGIN, True),  # within both
        ((1 - 2 * LOSS_TOLERANCE) * math.log(10), 0.10, False),  # the loss fell: learning
        (math.log(10), 0.10 + 2 * ACCURACY_MARGIN, False),  # ranks classes: learning
        (1.01 * WORSE_THAN_CHANCE * math.log(10), 0.30, True),  # worse than chance
        (math.inf, 0.10, False),  # non-finite is "diverged", not "chance"
    ],
)
def test_decision_rule(loss, accuracy, flagged):
    level = ChanceLevel(loss=math.log(10), accuracy=0.10)
    assert level.reached_by({"loss": loss, "accuracy": accuracy}) is flagged
    assert level.reached_by({"loss": math.log(10)})  # without accuracy the loss decides


def test_a_collapsed_run_is_reported_as_chance_and_a_learning_one_as_done(tmp_path):
    """SGD at lr 20 collapses the student to a constant output; lr 0.3 learns."""
    results = {}
    for lr in (20.0, 0.3):
        config = RunConfig(
            task="teacher-student", task_options=TINY, optimizer="sgd", lr=lr, batch_size=64,
            epochs=3, warmup_steps=0, out_dir=str(tmp_path / f"lr{lr}"),
        )  # fmt: skip
        results[lr] = train(config)
    collapsed, learned = results[20.0], results[0.3]
    level = chance_level(get_task("teacher-student", **TINY))
    assert collapsed.status == "chance"
    assert "no better than chance level" in collapsed.error
    assert f"{level.loss:.4f}" in collapsed.error
    assert collapsed.final_train_loss is not None  # the values stay, flagged
    assert learned.status == "done" and learned.error is None
    assert learned.final_train_loss < (1 - LOSS_TOLERANCE) * level.loss
