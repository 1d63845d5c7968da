"""AdaScale: the gain against its closed form, the base schedule without variance, exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from quadratic_task import build as build_quadratic
from quadratic_task import curvatures
from tiny_train_task import build, final_checkpoint, read_metrics
from torch.optim.lr_scheduler import LambdaLR

from largebatch.train import RunConfig, train
from largebatch.train.adascale import AdaScale, AdaScaleSchedule, adascale_gain
from largebatch.train.schedules import WarmupThenDecay


def _closed_form(trace: float, grad_sqnorm: float, base: int, batch: int) -> float:
    """Johnson et al.'s gain, (sigma^2 + |G|^2) / (sigma^2 / S + |G|^2), sigma^2 = tr / base."""
    sigma2, scale = trace / base, batch / base
    return (sigma2 + grad_sqnorm) / (sigma2 / scale + grad_sqnorm)


@pytest.mark.parametrize(
    ("trace", "grad_sqnorm", "base", "batch"),
    [(32.0, 1.0, 8, 64), (1.0, 5.0, 8, 64), (10.0, 0.0, 8, 64), (3.0, 2.0, 64, 16)],
)
def test_gain_is_the_closed_form(trace, grad_sqnorm, base, batch):
    assert adascale_gain(trace, grad_sqnorm, base, batch) == pytest.approx(
        _closed_form(trace, grad_sqnorm, base, batch), rel=1e-12
    )


def test_gain_stays_between_one_and_the_scale():
    """Noisy estimates can be negative: they count as 0, and the gain stays in [1, S]."""
    assert (
        adascale_gain(-1.0, 2.0, 8, 64) == 1.0
    )  # no measured variance: a bigger batch buys nothing
    assert adascale_gain(5.0, -3.0, 8, 64) == 8.0  # no measured signal: linear scaling
    assert adascale_gain(0.0, 0.0, 8, 64) == 1.0  # nothing known
    assert adascale_gain(math.nan, 1.0, 8, 64) == 1.0
    assert adascale_gain(5.0, -3.0, 64, 16) == 0.25  # below the base batch: in [S, 1]


def test_without_variance_information_it_is_the_base_schedule():
    """No statistics (gain 1): every rate is the base schedule's, bitwise, and it ends on time."""
    base = WarmupThenDecay(total_steps=48, warmup_steps=6, decay="cosine", warmup_start=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.3)
    adascale = AdaScale(optimizer, AdaScaleSchedule(base, base_batch_size=8, batch_size=64))
    reference_optimizer = torch.optim.SGD([param], lr=0.3)
    reference = LambdaLR(reference_optimizer, base)
    steps = 0
    while not adascale.finished:
        assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]
        optimizer.step()
        reference_optimizer.step()
        adascale.step(torch.tensor(1.0))
        reference.step()
        steps += 1
    assert steps == base.total_steps and adascale.progress == base.total_steps


def _common(**fields) -> dict:
    settings = dict(
        lr=0.05, batch_size=32, base_batch_size=32, accumulation_steps=2, steps=12,
        warmup_steps=2, eval_every=1,
    )  # fmt: skip
    return {**settings, **fields}


def test_one_base_batch_trains_exactly_as_without_adascale(make_config):
    """At batch = base batch the gain is exactly 1: the run is bitwise the fixed-schedule run."""
    plain = make_config("plain", **_common(scaling="none"))
    adaptive = make_config("adascale", **_common(scaling="adascale"))
    results = [train(plain), train(adaptive)]
    assert [r.steps for r in results] == [12, 12]
    assert results[1].extra["adascale_gain"] == 1.0
    rows = [read_metrics(c.out_dir) for c in (plain, adaptive)]
    assert [r["lr"] for r in rows[0]] == [r["lr"] for r in rows[1]]
    ours, theirs = (final_checkpoint(c.out_dir)["model"] for c in (adaptive, plain))
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def test_measured_gain_on_a_noisy_quadratic_matches_the_closed_form(make_config):
    """Points xi ~ N(m, 1) in 32 dimensions, w held at 0 (tiny rate): tr(Sigma) and |G|^2 are
    those of the training set, B_simple about 1 / m^2 = 32. Batch 64 of micro-batches of 8
    against base batch 8: the gain is about 3.3; the measured one (the noise-scale averages of
    the run itself, over about 100 steps) is within 5 %."""
    options = dict(dim=32, top=1.0, mean=32**-0.5, num_train=16384)
    task = build_quadratic(**options)
    points, h = task.train.tensors[0].double(), curvatures(32, 1.0).double()
    grad_sqnorm = (h * points.mean(0)).pow(2).sum().item()
    trace = (h**2 * points.var(0, unbiased=False)).sum().item()
    expected = _closed_form(trace, grad_sqnorm, 8, 64)
    config = make_config(
        task="quadratic_task:build", task_options=options,
        optimizer_options={"momentum": 0.0, "weight_decay": 0.0}, lr=1e-8, base_batch_size=8,
        batch_size=64, accumulation_steps=8, steps=40, schedule="constant", scaling="adascale",
        eval_every=1000,
    )  # fmt: skip
    result = train(config, task=task)
    measured = result.extra["adascale_gain"]
    assert 2.5 < expected < 4.0
    assert measured == pytest.approx(expected, rel=0.05)
    # the run lasted until its scale-invariant progress covered S x 40 base-batch steps
    assert result.extra["scale_invariant_steps"] >= 8 * 40
    assert 8 * 40 / 8 <= result.steps <= math.ceil(8 * 40 / expected * 1.2)
    # negative control: twice the gradient variance predicts a clearly different gain
    assert measured != pytest.approx(_closed_form(2 * trace, grad_sqnorm, 8, 64), rel=0.05)


def test_resume_continues_gain_and_progress_exactly(make_config):
    """A run that dies at step 9 and resumes from its step-8 checkpoint ends bitwise where the
    uninterrupted run ends: same number of steps, gain, progress and parameters."""
    fields = _common(batch_size=64, base_batch_size=16, accumulation_steps=4, checkpoint_every=4)
    fields["scaling"] = "adascale"
    reference = train(make_config("uninterrupted", **fields))
    interrupted = make_config("resumed", **fields)
    assert train(interrupted, task=build(fail_after=4 * 9)).status == "failed"
    resumed = train(make_config("resumed", resume=True, **fields), task=build())
    assert resumed.steps == reference.steps
    for key in ("adascale_gain", "scale_invariant_steps"):
        assert resumed.extra[key] == reference.extra[key], key
    ours = final_checkpoint(interrupted.out_dir)["model"]
    theirs = final_checkpoint(make_config("uninterrupted").out_dir)["model"]
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert read_metrics(interrupted.out_dir) != []
    columns = ("step", "lr", "adascale_gain", "scale_invariant_steps")
    assert [tuple(r[c] for c in columns) for r in read_metrics(interrupted.out_dir)] == [
        tuple(r[c] for c in columns) for r in read_metrics(make_config("uninterrupted").out_dir)
    ]


def test_adascale_without_a_variance_source_is_refused(make_config, probe_registered):
    with pytest.raises(ValueError, match="Invalid scaling: 'adascale' has no gradient variance"):
        make_config(scaling="adascale")  # one process, no accumulation
    with pytest.raises(ValueError, match="Invalid noise_scale: False with scaling='adascale'"):
        make_config(scaling="adascale", accumulation_steps=2, noise_scale=False)
    closure_only = make_config(
        scaling="adascale", accumulation_steps=2, optimizer="protocol-probe",
        optimizer_options={"gradient_before_step": False},
    )  # fmt: skip
    with pytest.raises(ValueError, match="scaling='adascale': in one process the gradient"):
        train(closure_only)
    assert not Path(closure_only.out_dir).exists()


def test_plan_stretches_the_base_schedule_by_the_scale(make_config):
    """In scale-invariant steps: S x the steps and warm-up; the optimizer starts at the base rate."""
    from largebatch.train import plan_run

    config = make_config(**_common(batch_size=64, base_batch_size=16, warmup_steps=3))
    config = RunConfig.from_dict({**config.to_dict(), "scaling": "adascale"})
    plan = plan_run(config, build())
    assert plan.lr == 0.05 and plan.schedule.scale == 4
    assert (plan.schedule.base.total_steps, plan.schedule.base.warmup_steps) == (48, 12)
    assert plan.total_steps == 48  # at most: gain 1 on every step
