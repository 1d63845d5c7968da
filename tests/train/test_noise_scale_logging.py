"""The gradient noise scale logged by the training loop: what it reads, what it logs, and that
it leaves training alone."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_train_task import build, final_checkpoint, read_metrics
from torch.nn import functional as F

from largebatch.train import train
from largebatch.train.noise_scale import NoiseScaleMonitor
from largebatch.train.step import forward_backward


def _flat_grad(model, inputs, targets) -> torch.Tensor:
    """The gradient of the mean loss on one batch, from scratch."""
    model.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def test_forward_backward_reads_the_micro_batch_and_whole_batch_norms():
    """The two norms equal those of gradients computed separately on micro-batch 0 and the batch."""
    task = build()
    torch.manual_seed(0)
    model = task.build_model()
    inputs, targets = task.train.tensors
    micro_batches = [(inputs[i : i + 8], targets[i : i + 8]) for i in range(0, 32, 8)]
    first = _flat_grad(model, *micro_batches[0])
    whole = _flat_grad(model, inputs[:32], targets[:32])

    model.zero_grad(set_to_none=True)
    sqnorms = []
    forward_backward(model, micro_batches, F.cross_entropy, contextlib.nullcontext, sqnorms=sqnorms)
    assert len(sqnorms) == 2
    assert sqnorms[0].item() == pytest.approx(first.dot(first).item(), rel=1e-5)
    assert sqnorms[1].item() == pytest.approx(whole.dot(whole).item(), rel=1e-5)


def test_monitor_row_is_the_two_batch_estimate_of_the_interval_means():
    """``noise_scale`` = mean tr(Sigma) / mean |G|^2 over the interval, re-derived by hand."""
    monitor = NoiseScaleMonitor("accumulation", torch.nn.Linear(1, 1), 4, 16, every=1)
    assert monitor.row() == {"noise_scale": "", "noise_scale_ema": ""}  # nothing measured yet
    norms = [(5.0, 2.0), (3.0, 1.2), (4.0, 2.2)]
    for step, (small, big) in enumerate(norms):
        monitor.update(step, [torch.tensor(small, dtype=torch.float64),
                              torch.tensor(big, dtype=torch.float64)])  # fmt: skip
    small = sum(s for s, _ in norms) / 3
    big = sum(b for _, b in norms) / 3
    grad_sqnorm = (16 * big - 4 * small) / (16 - 4)
    trace = (small - big) / (1 / 4 - 1 / 16)
    row = monitor.row()
    assert row["noise_scale"] == pytest.approx(trace / grad_sqnorm, rel=1e-12)
    assert row["noise_scale_ema"] == pytest.approx(monitor.tracker.estimate().b_simple)
    assert monitor.row()["noise_scale"] == ""  # a new interval starts after each row


def test_logging_appears_and_leaves_training_bitwise_unchanged(make_config):
    common = dict(batch_size=32, accumulation_steps=4, steps=12, eval_every=4)
    runs = {
        "logged": make_config("logged", noise_scale=True, noise_scale_every=1, **common),
        "quiet": make_config("quiet", noise_scale=False, **common),
        "every 5": make_config("every5", noise_scale_every=5, **common),  # default noise_scale
    }
    results = {name: train(config) for name, config in runs.items()}
    params = {name: final_checkpoint(c.out_dir)["model"] for name, c in runs.items()}
    for name in ("quiet", "every 5"):
        assert params[name].keys() == params["logged"].keys()
        for key in params["logged"]:
            assert torch.equal(params[name][key], params["logged"][key]), (name, key)

    rows = read_metrics(runs["logged"].out_dir)
    assert [r["noise_scale"] for r in rows][0] == ""  # step 0: nothing measured yet
    values = [float(r["noise_scale_ema"]) for r in rows[1:]]
    assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)
    assert results["logged"].extra["noise_scale"] == pytest.approx(values[-1])
    assert results["logged"].extra["noise_scale_trace_covariance"] > 0
    assert "noise_scale" not in read_metrics(runs["quiet"].out_dir)[0]
    assert "noise_scale" not in results["quiet"].extra
    # one process without accumulation cannot measure for free: nothing is logged by default
    plain = train(make_config("plain", batch_size=32, steps=4))
    assert "noise_scale" not in read_metrics(make_config("plain").out_dir)[0]
    assert "noise_scale" not in plain.extra


def test_resume_continues_the_noise_scale_exactly(make_config):
    settings = dict(batch_size=32, accumulation_steps=2, steps=12, eval_every=4,
                    checkpoint_every=6, noise_scale_every=2)  # fmt: skip
    config = make_config(**settings)
    train(config)
    out = Path(config.out_dir)
    uninterrupted = read_metrics(config.out_dir)
    result = json.loads((out / "result.json").read_text())
    # back to the state right after the step-6 checkpoint, as if killed there
    (out / "checkpoints" / "step-000000012.pt").unlink()
    (out / "result.json").unlink()
    resumed = train(make_config(**settings, resume=True))
    rows = read_metrics(config.out_dir)
    columns = ["step", "noise_scale", "noise_scale_ema"]
    assert [[r[c] for c in columns] for r in rows] == [
        [r[c] for c in columns] for r in uninterrupted
    ]
    assert resumed.extra["noise_scale"] == result["extra"]["noise_scale"]


def test_bad_noise_scale_settings_are_refused(make_config, probe_registered):
    with pytest.raises(ValueError, match="noise_scale=True needs two gradients"):
        train(make_config(noise_scale=True))
    with pytest.raises(ValueError, match="Invalid noise_scale_every: 0"):
        train(make_config(noise_scale_every=0))
    with pytest.raises(ValueError, match="Invalid noise_scale: 'yes'"):
        train(make_config(noise_scale="yes"))
    closure_only = make_config(
        optimizer="protocol-probe", accumulation_steps=2, noise_scale=True,
        optimizer_options={"gradient_before_step": False, "closure": "same"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="computes none before its step"):
        train(closure_only)
