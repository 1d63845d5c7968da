"""Presets of published recipes: the schedules they resolve to, re-derived from the papers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_train_task import TINY_TASK, build

from largebatch.cli import main
from largebatch.train import RunConfig, plan_run
from largebatch.train.presets import PRESETS, apply_preset
from largebatch.train.schedules import build_scheduler


def _rates(plan) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.lr)
    scheduler = build_scheduler(optimizer, plan.schedule)
    rates = []
    for _ in range(plan.total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_goyal_is_gradual_warmup_from_the_small_batch_rate_then_steps(tmp_path):
    """Goyal et al.: eta = 0.1 per 256, k = B / 256; the rate rises by a constant increment
    from eta to k eta over 5 epochs, then is divided by 10 at epochs 30, 60 and 80 of 90."""
    given = {"task": TINY_TASK, "batch_size": 32, "base_batch_size": 8, "epochs": 90.0}
    config = RunConfig(**apply_preset("goyal", given), out_dir=str(tmp_path))
    plan = plan_run(config, build())  # 128 examples: 4 steps per epoch, 360 steps
    eta, k, warmup = 0.1, 32 / 8, 5 * 4
    expected = []
    for t in range(360):
        if t < warmup:
            expected.append(eta + (k * eta - eta) * (t + 1) / warmup)
        else:
            expected.append(k * eta * 0.1 ** sum(t >= e * 4 for e in (30, 60, 80)))
    assert _rates(plan) == pytest.approx(expected, rel=1e-12)
    assert config.optimizer == "sgd" and config.optimizer_options == {
        "momentum": 0.9,
        "weight_decay": 1e-4,
    }


def test_shacklett_is_sqrt_scaling_one_percent_warmup_from_half_and_cosine_to_a_floor(tmp_path):
    """Shacklett et al.: 5e-4 per 256 samples times sqrt(B / 256); linear warm-up over 1 % of
    training from 0.5x to 1x; cosine decay to 1 % of the rate; LAMB with ||w|| capped at 10."""
    given = {"task": TINY_TASK, "batch_size": 64, "base_batch_size": 16, "steps": 400}
    config = RunConfig(**apply_preset("shacklett-ppo", given), out_dir=str(tmp_path))
    plan = plan_run(config, build())
    peak, warmup = 5e-4 * math.sqrt(64 / 16), 4
    expected = []
    for t in range(400):
        if t < warmup:
            expected.append(peak * (0.5 + 0.5 * (t + 1) / warmup))
        else:
            progress = (t - warmup) / (400 - warmup)
            expected.append(peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert _rates(plan) == pytest.approx(expected, rel=1e-12)
    assert config.optimizer == "lamb"
    assert tuple(config.optimizer_options["weight_norm_clamp"]) == (0.0, 10.0)
    assert tuple(config.optimizer_options["trust_ratio_clamp"]) == (0.01, 100.0)
    # below 256 samples the rate is not scaled down (their max(1, sqrt(B / 256)))
    small = apply_preset("shacklett-ppo", {"batch_size": 64})
    assert small["scaling"] == "none" and small["warmup_epochs"] == pytest.approx(0.1)


def test_explicit_values_win_and_another_optimizer_drops_the_recipes_options():
    values = apply_preset(
        "goyal", {"lr": 0.2, "optimizer_options": {"nesterov": True}, "warmup_steps": 7}
    )
    assert values["lr"] == 0.2 and values["warmup_steps"] == 7 and values["warmup_epochs"] is None
    assert values["optimizer_options"] == {"momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    assert "optimizer_options" not in apply_preset("goyal", {"optimizer": "adamw"})
    with pytest.raises(KeyError, match="Unknown preset 'goyall'. Did you mean 'goyal'"):
        apply_preset("goyall", {})


def test_cli_preset_and_list(tmp_path):
    out = tmp_path / "run"
    args = [
        "run", "--task", TINY_TASK, "--preset", "goyal", "--batch-size", "32",
        "--base-batch-size", "8", "--steps", "8", "--warmup", "2", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((Path(out) / "config.json").read_text())
    assert saved["config"]["schedule"] == "step" and saved["config"]["lr"] == 0.1
    assert saved["plan"]["lr"] == pytest.approx(0.4)
    listed = CliRunner().invoke(main, ["list", "presets"])
    assert listed.exit_code == 0
    for preset in PRESETS.values():
        assert preset.name in listed.output and preset.reference in listed.output
    unknown = CliRunner().invoke(main, [*args[:3], "--preset", "nope"])
    assert unknown.exit_code == 2 and "Unknown preset 'nope'" in unknown.output
