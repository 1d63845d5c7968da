"""The training loop: accumulation, outcomes (diverged, failed, target), step protocols."""

from __future__ import annotations

import json
import math
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
from tiny_train_task import assert_same_params, build, final_checkpoint, read_metrics

from largebatch.optim import list_optimizers
from largebatch.optim.registry import is_decentralized
from largebatch.train import train


def test_accumulation_matches_one_big_batch(make_config):
    """Batch 32 as 4 micro-batches of 8 ends where batch 32 in one piece does."""
    common = dict(batch_size=32, steps=6, optimizer_options={"momentum": 0.9})
    runs = {
        "whole": make_config("whole", accumulation_steps=1, **common),
        "pieces": make_config("pieces", accumulation_steps=4, **common),
        "smaller batch": make_config("small", **{**common, "batch_size": 8}),
    }
    results = {name: train(config) for name, config in runs.items()}
    assert {r.status for r in results.values()} == {"done"}
    assert results["whole"].examples == results["pieces"].examples == 6 * 32
    params = {name: final_checkpoint(config.out_dir)["model"] for name, config in runs.items()}
    assert_same_params(params["whole"], params["pieces"], atol=1e-6)
    with pytest.raises(AssertionError):  # the comparison can fail: batch 8 ends elsewhere
        assert_same_params(params["whole"], params["smaller batch"], atol=1e-6)


def test_run_directory_and_result(make_config):
    config = make_config(steps=8, eval_every=3, progress=True)
    result = train(config)
    out = Path(config.out_dir)
    assert result.status == "done" and result.steps == 8 and result.examples == 8 * 16
    saved = json.loads((out / "result.json").read_text())
    assert saved["status"] == "done" and saved["final_test_accuracy"] == result.final_test_accuracy
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["batch_size"] == 16
    assert {"torch", "python", "largebatch"} <= meta["versions"].keys()
    assert "git" in meta
    rows = read_metrics(config.out_dir)
    assert [int(r["step"]) for r in rows] == [0, 3, 6, 8]  # step 0, every 3, and the end
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(result.final_test_accuracy)
    assert float(rows[-1]["examples"]) == 8 * 16
    # evaluation really measures the model: recompute the final test loss by hand
    task = build()
    model = task.build_model()
    model.load_state_dict(final_checkpoint(config.out_dir)["model"])
    model.eval()
    inputs, targets = task.test.tensors
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(inputs), targets).item()
    assert result.final_test_loss == pytest.approx(expected, rel=1e-5)


def test_huge_learning_rate_is_recorded_as_diverged(make_config):
    config = make_config(lr=1e12, steps=30, optimizer_options={"momentum": 0.9})
    result = train(config)
    assert result.status == "diverged"
    assert result.steps < 30
    assert result.final_test_loss is None  # the final model is not finite
    assert json.loads((Path(config.out_dir) / "result.json").read_text())["status"] == "diverged"


def test_exception_during_training_is_recorded_as_failed(make_config):
    task = build()
    calls = {"n": 0}

    def failing_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return torch.nn.functional.cross_entropy(outputs, targets)

    task.loss_fn = failing_loss
    config = make_config(steps=20, eval_every=100)
    result = train(config, task=task)
    assert result.status == "failed"
    assert result.error == "RuntimeError: disk on fire"
    assert json.loads((Path(config.out_dir) / "result.json").read_text())["status"] == "failed"
    # the full traceback survives, not only the one-line message
    log = Path(result.error_log)
    assert log == Path(config.out_dir) / "error.log"
    text = log.read_text()
    assert text.startswith("Traceback") and "failing_loss" in text and "disk on fire" in text


def test_bad_config_raises_before_training(make_config):
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        train(make_config(batch_size=0))
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        train(make_config(optimizer_options={"momentun": 0.9}))
    assert not (Path(make_config().out_dir) / "result.json").exists()


def test_stop_at_target_records_steps_and_examples(make_config):
    config = make_config(
        steps=200, eval_every=2, lr=0.5, target=("accuracy", 0.6), stop_at_target=True
    )
    result = train(config)
    assert result.status == "done"
    assert result.steps_to_target is not None and result.steps_to_target % 2 == 0
    assert result.steps == result.steps_to_target < 200
    assert result.examples_to_target == result.steps_to_target * 16
    assert result.final_test_accuracy >= 0.6
    rows = read_metrics(config.out_dir)
    reached = [int(r["step"]) for r in rows if float(r["test_accuracy"]) >= 0.6]
    assert reached[0] == result.steps_to_target


# --- step protocols: a probe optimizer records what the loop did ---------------------------


def _probe_state(out_dir: str) -> dict:
    state = final_checkpoint(out_dir)["optimizer"]["state"]
    return state[0]  # first parameter


@pytest.mark.usefixtures("probe_registered")
@pytest.mark.parametrize(
    ("options", "grads_per_step", "batches_per_step"),
    [
        ({"closure": None}, 1, 1),  # standard: loop gradient, step()
        ({"closure": "same"}, 2, 1),  # SAM-like
        ({"closure": "fresh"}, 2, 2),  # EXTRAP-SGD-like
        ({"gradient_before_step": False, "closure": "same", "closure_calls": 3}, 3, 1),  # L-BFGS
    ],
)
def test_step_protocol_is_honoured(make_config, options, grads_per_step, batches_per_step):
    steps = 5
    config = make_config(
        optimizer="protocol-probe", steps=steps, accumulation_steps=2, optimizer_options=options
    )
    result = train(config)
    assert result.status == "done"
    assert result.extra["gradient_evaluations"] == grads_per_step * steps
    assert result.examples == batches_per_step * steps * 16
    probe = _probe_state(config.out_dir)
    before = options.get("gradient_before_step", True)
    assert probe["steps_with_gradient"].item() == (steps if before else 0)
    closure_calls = probe["closure_calls"].item() if "closure_calls" in probe else 0
    assert closure_calls == (grads_per_step - before) * steps
    if options["closure"] == "same" and before:
        # same batch, same parameters: the closure reproduces the loop's gradient exactly
        assert torch.equal(probe["first_grad"], probe["closure_grad"])
    if options["closure"] == "fresh":
        assert not torch.allclose(probe["first_grad"], probe["closure_grad"])


def test_protocol_without_gradient_or_closure_is_rejected(make_config, probe_registered):
    config = make_config(
        optimizer="protocol-probe",
        optimizer_options={"gradient_before_step": False, "closure": None},
    )
    with pytest.raises(ValueError, match="declares neither gradient nor closure"):
        train(config)


def test_bf16_autocast_path_trains(make_config):
    """bf16 autocast (meant for GPUs) also runs on CPU; the model stays float32."""
    config = make_config(bf16=True, steps=6)
    result = train(config)
    assert result.status == "done"
    params = final_checkpoint(config.out_dir)["model"]
    assert all(p.dtype == torch.float32 for p in params.values())


def test_tensorboard_events_when_installed(make_config, monkeypatch):
    """With ``tensorboard`` importable, every metrics row also goes to a SummaryWriter."""
    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", Path(log_dir).name, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    train(make_config(steps=4, eval_every=2, checkpoint_every=2))
    assert calls[0] == ("init", "tensorboard", None)
    assert ("test_accuracy", 4) in calls and ("train_loss", 0) in calls
    assert calls[-1] == ("close",)
    calls.clear()
    train(make_config(steps=4, eval_every=2, checkpoint_every=2, resume=True))
    assert calls[0] == ("init", "tensorboard", 5)  # events after the checkpoint are purged


def test_real_tensorboard_gets_every_measured_scalar(make_config):
    """With the real ``tensorboard`` package: rows with empty (unmeasured) columns log fine.

    The noise-scale columns are empty on steps without a measurement; they once
    reached ``add_scalar`` as ``""`` and failed every run.
    """
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard extra (CI installs every extra)",
    )
    config = make_config(
        steps=6, eval_every=2, accumulation_steps=2, noise_scale=True, noise_scale_every=4
    )
    result = train(config)
    assert result.status == "done", result.error
    rows = read_metrics(config.out_dir)
    assert any(row["noise_scale"] == "" for row in rows)  # the case that crashed
    events = event_accumulator.EventAccumulator(str(Path(config.out_dir) / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss", "test_accuracy", "lr"} <= set(tags)
    assert [e.step for e in events.Scalars("train_loss")] == [0, 2, 4, 6]
    measured = [int(r["step"]) for r in rows if r["noise_scale"] != ""]
    assert [e.step for e in events.Scalars("noise_scale")] == measured
    final = events.Scalars("test_accuracy")[-1].value
    assert final == pytest.approx(result.final_test_accuracy, rel=1e-6)


@pytest.mark.parametrize(
    "name", [spec.name for spec in list_optimizers() if not is_decentralized(spec.name)]
)
def test_every_registered_optimizer_trains_through_the_loop(make_config, name):
    """Contract with the registry: each optimizer, closures included, runs under ``train``
    (the decentralized ones, which need processes, in ``test_decentralized_training.py``)."""
    result = train(make_config(optimizer=name, lr=None, steps=3, accumulation_steps=2))
    # three steps at the registry's rate test the loop, not learning: chance level is allowed
    assert result.status in ("done", "chance"), result.error
    assert result.extra["gradient_evaluations"] >= 3
    assert math.isfinite(result.final_train_loss)


def test_divergence_read_late_names_the_first_non_finite_step(make_config, monkeypatch):
    """Losses read every 8 steps find the step that reading every step stops at."""
    from largebatch.train import loop
    from largebatch.train.step_losses import StepLosses

    settings = dict(lr=1e12, steps=30, eval_every=8, optimizer_options={"momentum": 0.9})
    late = train(make_config("late", **settings))
    monkeypatch.setattr(loop, "StepLosses", partial(StepLosses, capacity=1))
    every_step = train(make_config("every", **settings))
    assert late.status == every_step.status == "diverged"
    first, read_late = (r.extra["divergence"] for r in (every_step, late))
    assert every_step.steps == first["step"] == first["checked_step"]  # stopped at once
    assert read_late["step"] == first["step"] and read_late["value"] == first["value"]
    assert read_late["checked_step"] == late.steps == 8 > first["step"]
    assert read_late["inputs_finite"] is first["inputs_finite"] is True
    assert "at step 8, when read: gradient non-finite" in late.error


def test_a_failure_after_a_non_finite_loss_is_a_divergence(make_config):
    """An optimizer or model that raises on NaN later in the same read interval."""
    task = build()
    non_finite_forwards = {"n": 0}

    def loss_that_raises_on_nan_twice(outputs, targets):
        if not torch.isfinite(outputs).all():
            non_finite_forwards["n"] += 1
            if non_finite_forwards["n"] == 2:
                raise RuntimeError("cannot factorise a NaN matrix")
        return torch.nn.functional.cross_entropy(outputs, targets)

    task.loss_fn = loss_that_raises_on_nan_twice
    config = make_config(lr=1e12, steps=30, eval_every=30, optimizer_options={"momentum": 0.9})
    result = train(config, task=task)
    assert result.status == "diverged"
    step = result.extra["divergence"]["step"]
    assert result.error.startswith(f"non-finite loss by step {step}: the training loss of step")
    assert result.error.endswith("; then RuntimeError: cannot factorise a NaN matrix")
    assert Path(result.error_log).read_text().startswith("Traceback")
