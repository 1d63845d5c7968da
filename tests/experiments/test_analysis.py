"""Numbers of a study: learning rate chosen on validation, seed aggregation, critical batch size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sweep_helpers import (
    EPOCHS,
    S_MIN,
    SYNTHETIC_BATCHES,
    SYNTHETIC_CRITICAL,
    TRAIN_SIZE,
    synthetic_accuracy,
)

from largebatch.experiments import analysis
from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.sweep_config import LATER_FIELDS


def test_learning_rate_is_chosen_on_validation_never_test(synthetic_sweep):
    """In the synthetic sweep lr 0.05 wins on val and lr 0.1 on test: 0.05 must be chosen."""
    points = analysis.points(ResultsStore(synthetic_sweep).rows())
    assert len(points) == len(SYNTHETIC_CRITICAL) * len(SYNTHETIC_BATCHES)
    for p in points:
        assert p.lrs == (0.05, 0.1)
        assert p.selected_by == "val accuracy"
        if p.optimizer == "sgd" and p.batch_size == 4096:
            continue  # see below
        assert p.lr == 0.05, (p.series, p.batch_size)
        expected = np.mean(
            [synthetic_accuracy(p.optimizer, p.batch_size, 0.05, s, "test") for s in (0, 1)]
        )
        assert p.mean("final_test_accuracy") == pytest.approx(expected)
        assert p.spread("final_test_accuracy") == pytest.approx(
            tuple(synthetic_accuracy(p.optimizer, p.batch_size, 0.05, s, "test") for s in (0, 1))
        )


def test_learning_rate_with_fewer_successful_seeds_loses():
    rows = []
    for lr, statuses, val in ((0.1, ["done", "diverged"], 0.99), (0.05, ["done", "done"], 0.5)):
        for seed, status in enumerate(statuses):
            rows.append(
                {
                    "cell_id": f"{lr}-{seed}", "optimizer": "sgd", "batch_size": 64, "lr": lr,
                    "seed": seed, "status": status, "final_val_accuracy": val,
                    "config": {"optimizer": "sgd", "batch_size": 64, "lr": lr, "seed": seed},
                }
            )  # fmt: skip
    (point,) = analysis.points(rows)
    assert point.lr == 0.05


def test_series_split_by_varying_config_fields():
    rows = [
        {"cell_id": f"c{i}", "optimizer": "sgd", "batch_size": 64, "lr": None, "seed": 0, "status": "done",
         "config": {"optimizer": "sgd", "epochs": epochs, "checkpoint_every": i}}
        for i, epochs in enumerate((10, 20))
    ]  # fmt: skip
    assert sorted(p.series for p in analysis.points(rows)) == ["sgd (epochs=10)", "sgd (epochs=20)"]


def test_each_topology_of_a_decentralized_optimizer_is_a_series():
    """A decentralized optimizer's series carries its topology, also when the sweep has one
    topology only; the learning rate is chosen per series, so a better rate on one graph
    does not decide the other's."""
    rows = [
        {"cell_id": f"{opt}-{topo}-{lr}", "optimizer": opt, "batch_size": 64, "lr": lr,
         "seed": 0, "status": "done", "final_val_accuracy": val,
         "config": {"optimizer": opt, "topology": topo, "lr": lr}}
        for opt, topo, lr, val in (
            ("dmsgd", "ring", 0.1, 0.9), ("dmsgd", "ring", 0.2, 0.8),
            ("dmsgd", "exp", 0.1, 0.7), ("dmsgd", "exp", 0.2, 0.95),
            ("sgd", None, 0.1, 0.5),
        )
    ]  # fmt: skip
    chosen = {(p.series, p.optimizer): p.lr for p in analysis.points(rows)}
    assert chosen == {
        ("dmsgd-exp", "dmsgd"): 0.2,
        ("dmsgd-ring", "dmsgd"): 0.1,
        ("sgd", "sgd"): 0.1,
    }
    one_topology = [row for row in rows if row["config"]["topology"] != "exp"]
    assert {p.series for p in analysis.points(one_topology)} == {"dmsgd-ring", "sgd"}


def test_a_field_added_later_counts_at_its_default_in_older_rows():
    """A resumed study's rows recorded before ``decay_floor`` existed and its new rows at the
    default stay one series; a new row off the default is a series of its own."""
    config = {"optimizer": "sgd", "epochs": 10}
    rows = [
        {"cell_id": f"c{i}", "optimizer": "sgd", "batch_size": 64, "lr": lr, "seed": 0,
         "status": "done", "config": {**config, **extra}}
        for i, (lr, extra) in enumerate(
            ((0.1, {}), (0.2, {"decay_floor": LATER_FIELDS["decay_floor"]}), (0.3, {"decay_floor": 0.1}))
        )
    ]  # fmt: skip
    series = sorted({p.series for p in analysis.points(rows)})
    assert series == ["sgd (decay_floor=0.0)", "sgd (decay_floor=0.1)"]
    assert len(analysis.points(rows[:2])) == 1 and analysis.points(rows[:2])[0].series == "sgd"


def mccandlish_steps(batch_sizes, s_min, b_crit):
    return [s_min * (1 + b_crit / b) for b in batch_sizes]


def test_critical_batch_size_matches_mccandlish_model():
    """On S(B) = S_min (1 + B_crit/B) the factor-2 point is 2 B0 + B_crit (dense grid)."""
    b0, b_crit = 8.0, 1000.0
    batch_sizes = b0 * 2 ** np.arange(0, 14, 0.125)
    critical = analysis.critical_batch_size(batch_sizes, mccandlish_steps(batch_sizes, 50, b_crit))
    assert critical.reference == b0
    assert critical.estimate == pytest.approx(2 * b0 + b_crit, rel=0.01)
    assert critical.describe().startswith("≈ 1,0")


def test_critical_batch_size_brackets_and_bounds():
    inf = math.inf
    perfect = analysis.critical_batch_size([64, 128, 256], [400, 200, 100])
    assert (perfect.estimate, perfect.low, perfect.high) == (None, 256, None)
    assert perfect.describe() == "> 256 (scaling never fell off)"
    cut = analysis.critical_batch_size([64, 256, 1024], [400, 110, inf])
    assert (cut.estimate, cut.low, cut.high) == (None, 256, 1024)
    assert cut.describe() == "between 256 and 1,024"
    # the smallest batch did not reach the target: the next one is the reference
    late = analysis.critical_batch_size([32, 64, 128], [inf, 100, 120])
    assert late.reference == 64
    # examples ratio 1 at 64 and 2.4 at 128: ratio 2 at log2(B/64) = log 2 / log 2.4
    assert late.estimate == pytest.approx(64 * 2 ** (math.log(2) / math.log(2.4)))
    assert (
        analysis.critical_batch_size([64], [inf]).describe() == "undefined (target never reached)"
    )
    with pytest.raises(ValueError, match="factor"):
        analysis.critical_batch_size([64], [1], factor=1.0)


def test_steps_model_fit_recovers_parameters():
    batch_sizes = [64, 256, 1024, 4096, 16384]
    steps = mccandlish_steps(batch_sizes, 75.0, 3000.0) + [math.inf]
    model = analysis.fit_steps_model(batch_sizes + [65536], steps)
    assert model.s_min == pytest.approx(75.0, rel=1e-9)
    assert model.b_crit == pytest.approx(3000.0, rel=1e-9)
    assert model.steps(3000.0) == pytest.approx(150.0)
    assert analysis.fit_steps_model([64, 128], [10, 5]) is None  # two points: no fit


def test_synthetic_sweep_critical_batch_sizes(synthetic_sweep):
    """The sweep's points give the critical batch sizes the synthetic truth implies."""
    series = analysis.by_series(analysis.points(ResultsStore(synthetic_sweep).rows()))
    for optimizer, critical in SYNTHETIC_CRITICAL.items():
        b = [p.batch_size for p in series[optimizer]]
        truth = mccandlish_steps(b, S_MIN, critical)
        budget = [EPOCHS * TRAIN_SIZE // size for size in b]
        measured = [p.median_to_target() for p in series[optimizer]]
        assert measured == [round(s) if s <= n else math.inf for s, n in zip(truth, budget)]
    sgd_b = [p.batch_size for p in series["sgd"]]
    sgd = analysis.critical_batch_size(sgd_b, [p.median_to_target() for p in series["sgd"]])
    exact = analysis.critical_batch_size(
        sgd_b, mccandlish_steps(sgd_b, S_MIN, SYNTHETIC_CRITICAL["sgd"])
    )
    assert 256 < sgd.estimate < 1024
    assert sgd.estimate == pytest.approx(exact.estimate, rel=0.02)  # steps are whole numbers
    # lamb reaches the target up to 1024 still scaling well, then runs out of steps at 4096
    lamb = analysis.critical_batch_size(sgd_b, [p.median_to_target() for p in series["lamb"]])
    assert (lamb.estimate, lamb.low, lamb.high) == (None, 1024, 4096)


def test_runs_that_set_their_own_rate_are_series_of_their_own():
    """AutoWU and AdaScale runs beside tuned ones (a study's adaptive cells) are the series
    ``lamb + autowu`` and ``lamb + adascale``: their own settings do not split the tuned
    series, whose budget differs by batch size only."""
    tuned = {"optimizer": "lamb", "schedule": "cosine", "scaling": None, "autowu_max_lr": 1.0}
    configs = {
        "tuned": tuned,
        "autowu": {**tuned, "schedule": "autowu", "autowu_max_lr": 0.3},
        "adascale": {**tuned, "scaling": "adascale", "base_batch_size": 32},
    }
    rows = [
        {"cell_id": f"{kind}-{batch}", "optimizer": "lamb", "batch_size": batch, "lr": 0.01,
         "seed": 0, "status": "done", "final_val_accuracy": 0.9,
         "config": {**config, "steps": 600 if batch > 128 else None}}
        for kind, config in configs.items()
        for batch in (128, 512)
    ]  # fmt: skip
    points = analysis.points(rows)
    assert sorted({p.series for p in points}) == ["lamb", "lamb + adascale", "lamb + autowu"]
    assert all(len([p for p in points if p.series == s]) == 2 for s in {p.series for p in points})
