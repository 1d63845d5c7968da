"""The studies' report text, built from their specs and results without running a study:
the tuning paragraph, the scaling study's steps and ratios, AdaScale against the base batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from largebatch.experiments.analysis import Point
from largebatch.experiments.studies import Tuned, get_study
from largebatch.experiments.studies.adaptive import accuracy_base_verdict, steps_base_verdict
from largebatch.experiments.studies.common import tuning_text
from largebatch.experiments.studies.scaling import knife_edges, reached_text, scaling_ratios
from largebatch.experiments.tuning import TuningState


def _part(study: str, name: str, states: dict | None = None, protocol=None):
    """What :func:`tuning_text` reads of a part: its spec, its protocol and tuning states."""
    part = next(p for p in get_study(study).parts if p.name == name)
    return SimpleNamespace(
        factory=SimpleNamespace(spec=part.spec()),
        protocol=protocol or part.protocol,
        states=states or {},
    )


def _state(chosen: float, at_edge: str | None = None, extensions: int = 0) -> TuningState:
    return TuningState((0.01, 0.02, 0.04), (), chosen, at_edge, extensions)


def test_tuning_text_follows_each_studys_rule_criterion_and_edges():
    """Shampoo's transformer: no scaling, fewest steps to a training target; alto: each
    optimizer's rule from batch 64, best validation accuracy; decentralized: values that
    stayed at an edge are named with the extension limit."""
    shampoo = tuning_text(_part("shampoo", "modadd-transformer"))
    assert "no scaling rule" in shampoo and "batch 64" not in shampoo
    assert "fewest steps to the target (training accuracy ≥ 0.95)" in shampoo
    assert "on the training split" in shampoo and "validation" not in shampoo

    alto = tuning_text(_part("alto", "mnist1d-cnn", {("sgd", None, 64): _state(0.02)}))
    assert "given at batch 64" in alto
    assert "linear for sgd, lars; square root for adamw, lamb, alto" in alto
    assert "best final validation accuracy" in alto and "every chosen value ended interior" in alto

    states = {
        ("dmsgd", "ring", 4096): _state(0.04, "high", 2),
        ("sgd", None, 4096): _state(0.02, None, 1),
    }
    decentralized = tuning_text(_part("decentralized", "mnist1d-cnn", states))
    assert "at most 2 values" in decentralized
    assert "1 chosen value stayed at the edge after 2 added: dmsgd-ring at 4,096 (high)" in (
        decentralized
    )

    demo = tuning_text(_part("demo", "mnist1d-cnn", protocol=Tuned(seeds_from=1024)))
    assert "at the chosen value (at batch sizes ≥ 1,024)" in demo


def _runs(*steps: float | None, status: str = "done", accuracy: float = 0.97) -> list[dict]:
    return [
        {"status": status, "seed": i, "steps_to_target": s, "final_test_accuracy": accuracy}
        for i, s in enumerate(steps)
    ]


def _point(optimizer: str, batch: int, runs: list[dict]) -> Point:
    return Point(optimizer, optimizer, batch, 0.1, (0.1,), "steps to target", runs)


def test_steps_cells_and_ratios_to_perfect_scaling():
    """Median steps with (reached/seeds); S(B) B / (S(B0) B0); a ratio within 5% of 2 is
    named with the steps that would make it exactly 2."""
    assert reached_text(_point("adamw", 512, _runs(105, 135))) == "120 (2/2)"
    assert reached_text(_point("adamw", 512, _runs(105, None))) == "not reached (1/2)"
    measured = {
        "b": [32, 128, 512, 1024],
        "steps": [972.0, 283.5, 120.0, math.inf],
        "critical": SimpleNamespace(factor=2.0),
    }
    ratios = scaling_ratios(measured)
    assert ratios[:3] == pytest.approx([1.0, 283.5 * 4 / 972, 120 * 16 / 972])
    assert ratios[3] == math.inf
    unreached = {"b": [32, 64, 128], "steps": [math.inf, 100.0, 60.0]}
    assert scaling_ratios(unreached)[1:] == pytest.approx([1.0, 1.2])  # from the first reached
    assert math.isnan(scaling_ratios(unreached)[0])
    (edge,) = knife_edges({"adamw": measured})
    assert edge == "adamw at 512 (1.975×: 120 steps against 121.5 for 2×)"


def _columns(tuned: dict, adascale: dict, base: int = 64) -> SimpleNamespace:
    batch_sizes = sorted({b for _, b in tuned} | {b for _, b in adascale})
    return SimpleNamespace(
        tuned=tuned,
        adaptive={"adascale": adascale, "autowu": {}},
        optimizers=["sgd"],
        batch_sizes=batch_sizes,
        base_batch=base,
    )


def test_adascale_is_judged_against_the_tuned_base_batch():
    """Kept within one point of the tuned base batch's accuracy with every seed finished,
    whatever the tuned large-batch cell reached; a seed at chance loses the batch size."""
    tuned = {
        ("sgd", 64): _point("sgd", 64, _runs(1, 1, accuracy=0.975)),
        ("sgd", 512): _point("sgd", 512, _runs(1, 1, accuracy=0.929)),
    }
    adascale = {
        ("sgd", 512): _point("sgd", 512, _runs(1, 1, accuracy=0.967)),
        ("sgd", 2048): _point("sgd", 2048, _runs(1, 1, accuracy=0.947)),
        ("sgd", 8640): _point(
            "sgd", 8640, _runs(1, accuracy=0.97) + _runs(None, status="chance", accuracy=0.1)
        ),
    }
    text = accuracy_base_verdict(_columns(tuned, adascale))
    assert "tuned base batch 64" in text
    assert "sgd keeps it at 512 (512 -0.8; 2,048 -2.8; 8,640 -0.5, 1 of 2 at chance)" in text

    steps = steps_base_verdict(_columns(tuned, {**adascale, ("sgd", 2048): _point(
        "sgd", 2048, _runs(300, None))}))  # fmt: skip
    assert "every seed reached the target: sgd at 512 of 3 batch sizes" in steps
