"""Learning-rate scaling and schedules, against torch's own schedulers as the reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    MultiStepLR,
    PolynomialLR,
    SequentialLR,
)

from largebatch.optim import get_spec
from largebatch.tasks import Task
from largebatch.train import RunConfig, plan_run
from largebatch.train.schedules import WarmupThenDecay, build_scheduler, scale_lr


def _lrs(make_scheduler, steps: int) -> list[float]:
    """Learning rate used at each of ``steps`` optimizer steps (base lr 1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _torch_reference(optimizer, total: int, warmup: int, decay: str, power: float, milestones):
    """The same schedule composed from torch's schedulers (independent of ours)."""
    decay_steps = total - warmup
    after = {
        "cosine": lambda: CosineAnnealingLR(optimizer, T_max=decay_steps),
        "poly": lambda: PolynomialLR(optimizer, total_iters=decay_steps, power=power),
        "constant": lambda: ConstantLR(optimizer, factor=1.0, total_iters=0),
        # torch's milestones count from the start of this phase
        "step": lambda: MultiStepLR(
            optimizer, [round(m * total) - warmup for m in milestones], gamma=0.1
        ),
    }[decay]
    if warmup == 0:
        return after()
    ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [ramp, after()], milestones=[warmup])


@pytest.mark.parametrize("decay", ["cosine", "poly", "step", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_schedule_matches_torch_composition(decay, warmup):
    total, power, milestones = 20, 2.0, (0.5, 0.75)
    ours = _lrs(
        lambda opt: build_scheduler(opt, WarmupThenDecay(total, warmup, decay, power, milestones)),
        total,
    )
    reference = _lrs(
        lambda opt: _torch_reference(opt, total, warmup, decay, power, milestones), total
    )
    assert ours == pytest.approx(reference, abs=1e-12)


def test_schedule_values_at_known_steps():
    cosine = WarmupThenDecay(total_steps=10, warmup_steps=4, decay="cosine")
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0
    assert cosine(7) == pytest.approx(0.5)  # halfway through the 6 decay steps
    assert WarmupThenDecay(10, 0, "poly", power=2.0)(5) == pytest.approx(0.25)
    assert WarmupThenDecay(10, 0, "poly", power=1.0)(9) == pytest.approx(0.1)
    step = WarmupThenDecay(8, 0, "step", milestones=(0.5, 0.75), gamma=0.1)
    assert [step(s) for s in (3, 4, 5, 6, 7)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])


def test_scheduler_state_round_trip_continues_identically():
    schedule = WarmupThenDecay(12, 3, "cosine")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = build_scheduler(optimizer, schedule)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = (optimizer.state_dict(), scheduler.state_dict())

    resumed_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    resumed = build_scheduler(resumed_opt, WarmupThenDecay(12, 3, "cosine"))
    resumed_opt.load_state_dict(state[0])
    resumed.load_state_dict(state[1])
    for _ in range(7):
        assert resumed_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        for opt, sched in ((optimizer, scheduler), (resumed_opt, resumed)):
            opt.step()
            sched.step()


@pytest.mark.parametrize(("rule", "expected"), [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_scale_lr(rule, expected):
    assert scale_lr(0.1, 256, 64, rule) == pytest.approx(expected)


def test_invalid_schedule_settings_name_the_value():
    with pytest.raises(ValueError, match="Invalid scaling rule: 'cubic'"):
        scale_lr(0.1, 256, 64, "cubic")
    with pytest.raises(ValueError, match="Invalid warmup_steps: 11"):
        WarmupThenDecay(10, 11)
    with pytest.raises(ValueError, match="Invalid decay: 'exp'"):
        WarmupThenDecay(10, 0, "exp")
    with pytest.raises(ValueError, match=r"Invalid decay milestones: \(1.5,\)"):
        WarmupThenDecay(10, 0, "step", milestones=(1.5,))


def _task_with(num_train: int) -> Task:
    data = torch.utils.data.TensorDataset(torch.zeros(num_train, 2), torch.zeros(num_train))
    return Task("t", data, data, build_model=lambda: torch.nn.Linear(2, 2), loss_fn=None)


def test_plan_uses_registry_recommendations_and_epoch_units(tmp_path):
    task = _task_with(1000)
    base = dict(out_dir=str(tmp_path), batch_size=100, base_batch_size=50)
    # SGD: linear scaling, 5% warm-up and the base lr from the registry
    plan = plan_run(RunConfig(optimizer="sgd", epochs=20, **base), task)
    assert (plan.steps_per_epoch, plan.total_steps) == (10, 200)
    assert plan.scaling == "linear"
    assert plan.lr == pytest.approx(2 * get_spec("sgd").defaults["lr"])
    assert plan.schedule.warmup_steps == 10
    # AdamW: square-root scaling; warm-up given in epochs
    plan = plan_run(
        RunConfig(optimizer="adamw", lr=1e-3, epochs=3, warmup_epochs=0.5, **base), task
    )
    assert plan.lr == pytest.approx(1e-3 * math.sqrt(2))
    assert plan.schedule.warmup_steps == 5
    # budget in examples rounds up to whole steps
    assert plan_run(RunConfig(examples=250, warmup_steps=0, **base), task).total_steps == 3


def test_plan_rejects_warmup_not_shorter_than_run(tmp_path):
    config = RunConfig(out_dir=str(tmp_path), batch_size=100, epochs=1, warmup_epochs=1)
    with pytest.raises(ValueError, match="Invalid warm-up: 10 steps is not shorter than the run"):
        plan_run(config, _task_with(1000))


def test_plan_takes_a_wrappers_default_lr_from_its_base(tmp_path):
    task = _task_with(1000)
    base = dict(out_dir=str(tmp_path), batch_size=64, epochs=1, scaling="none")
    on_lamb = plan_run(RunConfig(optimizer="e", optimizer_options={"base": "lamb"}, **base), task)
    on_default = plan_run(RunConfig(optimizer="e", **base), task)
    assert on_lamb.base_lr == get_spec("lamb").defaults["lr"]
    assert on_default.base_lr == get_spec("adamw").defaults["lr"] != on_lamb.base_lr


@pytest.mark.parametrize("decay", ["cosine", "step"])
def test_warmup_start_and_floor_match_torch(decay):
    """Warm-up from 0.25 of the peak is LinearLR's; a cosine to 0.01 is CosineAnnealingLR's
    eta_min; a step decay ends no lower than the floor (its factor rescaled above it)."""
    total, warmup, start, floor = 20, 5, 0.25, 0.01
    schedule = WarmupThenDecay(total, warmup, decay, warmup_start=start, floor=floor)
    ours = _lrs(lambda opt: build_scheduler(opt, schedule), total)

    def reference(optimizer):
        first = start + (1 - start) / warmup  # the step-0 factor: the first update moves
        ramp = LinearLR(optimizer, start_factor=first, end_factor=1.0, total_iters=warmup - 1)
        if decay == "cosine":
            after = CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=floor)
            return SequentialLR(optimizer, [ramp, after], milestones=[warmup])
        return SequentialLR(optimizer, [ramp, ConstantLR(optimizer, 1.0, 0)], [warmup])

    expected = _lrs(reference, total)
    if decay == "step":  # floor + (1 - floor) * 0.1 ** (milestones passed), by hand
        expected[warmup:] = [
            floor + (1 - floor) * 0.1 ** sum(s >= m * total for m in (0.5, 0.75))
            for s in range(warmup, total)
        ]
    assert ours == pytest.approx(expected, abs=1e-12)
    # negative control: without the floor the cosine ends lower
    if decay == "cosine":
        bare = _lrs(lambda opt: build_scheduler(opt, WarmupThenDecay(total, warmup, decay)), total)
        assert bare[-1] != pytest.approx(expected[-1], abs=1e-4)


def test_invalid_warmup_start_and_floor_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="Invalid warmup_start: 1.0"):
        RunConfig(out_dir=str(tmp_path), warmup_start=1.0)
    with pytest.raises(ValueError, match="Invalid decay_floor: -0.1"):
        RunConfig(out_dir=str(tmp_path), decay_floor=-0.1)
