"""Helpers for the sweep, results-database and report tests (fixtures: ``conftest.py``).

``tiny_spec`` is a real sweep small enough to train in about a second per cell;
``write_synthetic_sweep`` writes a sweep directory (database, run directories with
``config.json`` and ``metrics.csv``) from a known model of how accuracy and
steps-to-target depend on the batch size, so report tests need no training.
A uniquely named module rather than ``conftest``, which other test folders also have.
"""

from __future__ import annotations

import json
import math

import numpy as np

from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.sweep_config import SweepSpec, cell_id, load_sweep
from largebatch.train.config import RunConfig, RunResult

TINY_TASK_OPTIONS = {
    "num_train": 400, "num_test": 100, "input_dim": 8, "num_classes": 4,
    "teacher_hidden": 8, "student_hidden": 16,
}  # fmt: skip


def tiny_spec(**overrides) -> SweepSpec:
    """A checked sweep on a small teacher-student problem (360 training examples)."""
    settings = {
        "task": "teacher-student",
        "task_options": TINY_TASK_OPTIONS,
        "batch_sizes": [16, 64],
        "optimizers": ["sgd", "adamw"],
        "epochs": 3,
        "evals_per_run": 3,
        "target": ["accuracy", 0.3],
    }
    settings.update(overrides)
    return load_sweep(overrides=settings)


#: synthetic truth: optimizer -> critical batch size of S(B) = S_MIN (1 + B_crit / B)
SYNTHETIC_CRITICAL = {"sgd": 500.0, "lamb": 4000.0}
SYNTHETIC_BATCHES = [64, 256, 1024, 4096]
SYNTHETIC_LRS = [0.05, 0.1]
S_MIN = 40.0
EPOCHS = 30
TRAIN_SIZE = 8192


def synthetic_accuracy(optimizer: str, batch_size: int, lr: float, seed: int, split: str) -> float:
    """Accuracy falls as B passes B_crit; lr 0.05 is best on val, lr 0.1 best on test."""
    critical = SYNTHETIC_CRITICAL[optimizer]
    base = 0.95 - 0.5 * (batch_size / (batch_size + critical)) ** 2 + 0.002 * seed
    favoured = 0.05 if split == "val" else 0.1
    return base + (0.01 if lr == favoured else 0.0)


def write_synthetic_sweep(directory):
    """A sweep directory of 2 optimizers x 4 batch sizes x 2 lrs x 2 seeds, one diverged run."""
    store = ResultsStore(directory)
    for optimizer, critical in SYNTHETIC_CRITICAL.items():
        for b in SYNTHETIC_BATCHES:
            for lr in SYNTHETIC_LRS:
                for seed in (0, 1):
                    config = RunConfig(
                        optimizer=optimizer, batch_size=b, lr=lr, seed=seed, epochs=EPOCHS
                    )
                    identifier = cell_id(config)
                    total = EPOCHS * TRAIN_SIZE // b
                    to_target = S_MIN * (1 + critical / b)
                    reached = to_target <= total
                    diverged = optimizer == "sgd" and b == 4096 and lr == 0.1 and seed == 1
                    acc = {
                        s: synthetic_accuracy(optimizer, b, lr, seed, s)
                        for s in ("train", "val", "test")
                    }
                    result = RunResult(
                        status="diverged" if diverged else "done",
                        steps=total,
                        examples=total * b,
                        wall_time=1.0,
                        final_train_loss=0.1 + b / 1e5,
                        final_train_accuracy=acc["train"] + 0.03,
                        final_test_loss=0.2 + b / 5e4,
                        final_test_accuracy=acc["test"],
                        final_val_loss=0.2,
                        final_val_accuracy=acc["val"],
                        steps_to_target=round(to_target) if reached else None,
                        examples_to_target=round(to_target) * b if reached else None,
                        error="non-finite loss" if diverged else None,
                        extra={"total_steps": total},
                    )
                    run_dir = directory / "runs" / identifier
                    run_dir.mkdir(parents=True)
                    _write_run_files(run_dir, config, b, total, to_target)
                    store.record_run(identifier, config, result, run_dir=f"runs/{identifier}")
    return directory


def _write_run_files(run_dir, config, batch_size, total, to_target) -> None:
    steps_per_epoch = TRAIN_SIZE // batch_size
    target = {"split": "val", "metric": "accuracy", "value": 0.9}
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "config": config.to_dict(),
                "plan": {"steps_per_epoch": steps_per_epoch, "target": target},
            }
        )
    )
    lines = ["step,epoch,examples,train_loss,test_loss"]
    for step in np.linspace(0, total, 11).astype(int):
        loss = 2.3 * math.exp(-step / to_target) + 0.05
        lines.append(f"{step},{step / steps_per_epoch},{step * batch_size},{loss},{loss + 0.05}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
