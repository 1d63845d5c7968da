"""The learning-rate range test: the blow-up at a quadratic's stability limit, bad input, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from quadratic_task import build as build_quadratic
from tiny_train_task import TINY_TASK

from largebatch.cli import main
from largebatch.train import RunConfig
from largebatch.train.lr_finder import RangeTestSettings, range_test


def _quadratic_test(top: float, momentum: float, limit: float, seed: int = 0):
    """The range test on the 3-d quadratic with top curvature ``top``, swept around ``limit``."""
    config = RunConfig(
        task="quadratic_task:build", task_options={"top": top}, optimizer="sgd",
        optimizer_options={"momentum": momentum, "weight_decay": 0.0}, lr=1e-3, scaling="none",
        batch_size=32, base_batch_size=32, steps=1200, warmup_steps=0, seed=seed, out_dir="unused",
    )  # fmt: skip
    settings = RangeTestSettings(start_lr=0.05 * limit, end_lr=5 * limit, steps=1200)
    return range_test(config, settings, task=build_quadratic(top=top))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_blow_up_is_at_the_stability_limit_of_a_quadratic(momentum):
    """Curvature 4: gradient descent diverges above 2/4 (heavy ball: 2 (1 + beta) / 4).

    The sweep covers two decades in 1,200 steps (0.4 % per step): the smoothing's
    lag (the loss must grow about 150-fold to lift a 0.98 average to 4x its best)
    then costs well under 20 %. The suggestions lie below the limit.
    """
    limit = 2 * (1 + momentum) / 4.0
    result = _quadratic_test(4.0, momentum, limit)
    assert result.stopped == "blow-up"
    assert 0.8 * limit <= result.blow_up_lr <= 1.2 * limit
    assert result.suggested_lr < result.minimum_lr < limit
    assert result.steepest_lr < limit
    # negative control: twice the curvature blows up at half the rate, far outside the band
    stiffer = _quadratic_test(8.0, momentum, limit)
    assert not 0.8 * limit <= stiffer.blow_up_lr <= 1.2 * limit


def test_result_curves_and_smoothing_are_consistent():
    """Rates are geometric; the smoothed loss is the bias-corrected moving average of the losses."""
    result = _quadratic_test(4.0, 0.0, 0.5)
    n = len(result.lrs)
    ratio = (result.lrs[-1] / result.lrs[0]) ** (1 / (n - 1))
    assert ratio == pytest.approx((100.0) ** (1 / 1199), rel=1e-12)
    average = 0.0
    for i, loss in enumerate(result.losses):
        average = 0.98 * average + 0.02 * loss
        assert result.smoothed[i] == pytest.approx(average / (1 - 0.98 ** (i + 1)), rel=1e-12)
    assert result.smoothed[-1] > 4 * min(result.smoothed[:-1])  # the stop rule fired...
    assert all(  # ...and not before
        s <= 4 * min(result.smoothed[: i + 1]) for i, s in enumerate(result.smoothed[:-1])
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(start_lr=1.0, end_lr=0.1), "Invalid start_lr: 1.0 is not below end_lr=0.1"),
        (dict(start_lr=0.0), "Invalid start_lr: 0.0"),
        (dict(steps=2), "Invalid steps: 2"),
        (dict(smoothing=1.0), "Invalid smoothing: 1.0"),
        (dict(blow_up=1.0), "Invalid blow_up: 1.0"),
    ],
)
def test_bad_settings_name_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        RangeTestSettings(**settings)


def test_task_whose_loss_is_already_nan_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "lr-find"
    result = CliRunner().invoke(
        main,
        ["lr-find", "--task", TINY_TASK, "--task-opt", "nan_inputs=true", "--out", str(out)],
    )
    assert result.exit_code == 2, result.output
    assert "its loss at the initial parameters is nan" in result.output
    assert "tiny_train_task:build" in result.output
    assert not out.exists()


def test_cli_writes_the_figure_and_json_and_prints_the_suggestion(tmp_path):
    out = tmp_path / "lr-find"
    args = [
        "lr-find", "--task", TINY_TASK, "--optimizer", "sgd", "--batch-size", "32",
        "--steps", "40", "--start-lr", "1e-4", "--end-lr", "1e4", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert saved["config"]["batch_size"] == 32 and len(saved["lrs"]) == len(saved["losses"])
    assert saved["stopped"] in ("blow-up", "non-finite")
    assert saved["suggested_lr"] == pytest.approx(saved["minimum_lr"] / 10)
    assert f"{saved['suggested_lr']:.3g} (minimum / 10)" in result.output
    assert "--base-batch-size 32" in result.output
    again = CliRunner().invoke(main, args)  # a directory never holds two range tests
    assert again.exit_code == 2 and "already holds a range test" in again.output
    assert math.isfinite(saved["steepest_lr"])
    assert Path(out / "lr_find.json").stat().st_size > 0


def test_bad_cli_settings_and_several_processes_are_refused(tmp_path):
    result = CliRunner().invoke(
        main, ["lr-find", "--task", TINY_TASK, "--out", str(tmp_path / "x"), "--steps", "1"]
    )
    assert result.exit_code == 2 and "Invalid steps: 1" in result.output
    two = RunConfig(task=TINY_TASK, batch_size=32, nproc=2, out_dir=str(tmp_path / "y"))
    with pytest.raises(
        ValueError, match="Invalid nproc: 2 \\(the range test runs in one process\\)"
    ):
        range_test(two)
    growing = RunConfig(
        task=TINY_TASK,
        batch_size=32,
        batch_growth="geometric",
        steps=10,
        out_dir=str(tmp_path / "z"),
    )
    with pytest.raises(ValueError, match="Invalid batch_growth: 'geometric' \\(the range test"):
        range_test(growing)
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))
