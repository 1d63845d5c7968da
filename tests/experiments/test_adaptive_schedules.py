"""Adaptive schedules in sweeps (grid axes) and in the report (their section, AutoWU's switch)."""

from __future__ import annotations

import re

import pytest
from sweep_helpers import tiny_spec

from largebatch.experiments.report import report
from largebatch.experiments.results_store import ResultsStore
from largebatch.experiments.sweep import prepare, run_sweep
from largebatch.experiments.sweep_config import SweepConfigError, expand


def _cells(**overrides):
    spec = tiny_spec(batch_sizes=[64], optimizers=["sgd", "lamb"], **overrides)
    return expand(spec, "sweep", 360, lambda config: 5)


def test_schedules_and_scalings_are_grid_axes():
    """Each optimizer runs every (schedule, scaling); AutoWU once, without rate or scaling."""
    cells = _cells(
        schedules=["cosine", "autowu"], scalings=["linear", "adascale"], lr_factors=[0.5, 1.0],
        accumulation_steps=2,
    )  # fmt: skip
    seen = {(c.config.optimizer, c.config.schedule, c.config.scaling, c.config.lr) for c in cells}
    assert len(cells) == len(seen) == 2 * (2 * 2 + 1)
    autowu = [c for c in cells if c.config.schedule == "autowu"]
    assert [(c.config.lr, c.config.scaling, c.config.warmup_steps) for c in autowu] == [
        (None, None, None)
    ] * 2
    assert all(c.cell_id.split("-")[-2] == "autowu" for c in autowu)
    assert {c.config.scaling for c in cells if c.config.schedule == "cosine"} == {
        "linear",
        "adascale",
    }


def test_default_on_an_axis_is_the_optimizers_own_setting():
    """ "default" keeps each optimizer's setting (section, sweep, recommendation) on the axis."""
    cells = _cells(
        schedules=["default", "autowu"], scalings=["default", "adascale"],
        accumulation_steps=2, optimizer={"lamb": {"schedule": "poly"}},
    )  # fmt: skip
    assert [(c.config.optimizer, c.config.schedule, c.config.scaling) for c in cells] == [
        ("sgd", "cosine", None),
        ("sgd", "cosine", "adascale"),
        ("sgd", "autowu", None),
        ("lamb", "poly", None),
        ("lamb", "poly", "adascale"),
        ("lamb", "autowu", None),
    ]


def test_autowu_settings_reach_the_autowu_cells_only():
    cells = _cells(
        schedules=["default", "autowu"], autowu_max_lr=0.3,
        optimizer={"lamb": {"autowu_max_lr": 0.05, "autowu_decay": "constant-cosine"}},
    )  # fmt: skip
    settings = {
        (c.config.optimizer, c.config.schedule): (c.config.autowu_max_lr, c.config.autowu_decay)
        for c in cells
    }
    assert settings == {
        ("sgd", "cosine"): (1.0, "cosine"),  # the RunConfig defaults, unused
        ("sgd", "autowu"): (0.3, "cosine"),
        ("lamb", "cosine"): (1.0, "cosine"),
        ("lamb", "autowu"): (0.05, "constant-cosine"),
    }


def test_bad_axis_items_are_refused():
    with pytest.raises(SweepConfigError, match="scalings: item 0: expected one of 'default'"):
        tiny_spec(scalings=["cubic"])


def test_report_shows_the_adaptive_runs_and_the_autowu_switch(tmp_path):
    """A real sweep with AutoWU and AdaScale cells: the section, its table and figure."""
    spec = tiny_spec(
        batch_sizes=[16], optimizers=["sgd"], epochs=12, evals_per_run=12,
        schedules=["cosine", "autowu"], scalings=["adascale"], accumulation_steps=2,
        base_batch_size=8, autowu_max_lr=0.1,
    )  # fmt: skip
    # (autowu_max_lr: SGD's own cap, 0.3, leaves this tiny model at chance level)
    sweep = prepare(spec, tmp_path)
    statuses = run_sweep(sweep, progress=False)
    rows = {row["config"]["schedule"]: row for row in ResultsStore(tmp_path).rows()}
    assert set(statuses.values()) == {"done"}
    switch = rows["autowu"]["extra"]["autowu_switch_step"]
    assert switch is not None and rows["autowu"]["extra"]["autowu_peak_lr"] > 0
    assert rows["cosine"]["extra"]["adascale_scale"] == 2.0

    html_path, md_path = report(tmp_path)
    markdown = md_path.read_text()
    assert "## Adaptive learning-rate schedules" in markdown
    assert "![Training loss and learning rate of the adaptive runs]" in markdown
    assert (tmp_path / "figures" / "adaptive_schedules.png").exists()
    table = markdown[markdown.index("## Adaptive learning-rate schedules") :]
    autowu_row = next(line for line in table.splitlines() if "autowu" in line)
    assert re.search(rf"\| {switch} \|", autowu_row)
    assert rows["autowu"]["extra"]["autowu_switch_reason"] in autowu_row
