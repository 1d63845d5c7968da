"""The classical methods inside ``train``: batch growth, iterate averaging, SVRG's snapshots,
SAGA's indices, the cost in example gradients, and the settings that are refused."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_train_task import TINY_TASK, assert_same_params, build, final_checkpoint, read_metrics
from torch import nn
from torch.nn import functional as F

from largebatch.cli import main
from largebatch.diagnostics.per_example import per_example_gradients
from largebatch.train import train
from largebatch.train.checkpoint import list_checkpoints, load_checkpoint
from largebatch.train.launch import check
from largebatch.utils.errors import ConfigError

HERE = Path(__file__).parent


def _extra(config) -> dict:
    return json.loads((Path(config.out_dir) / "result.json").read_text())["extra"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _size_after(changes: list[list[int]], step: int) -> int:
    """The batch size of step ``step`` (0-based) from the recorded change points."""
    return [size for start, size in changes if start <= step][-1]


# --- batch growth -----------------------------------------------------------------------------


def test_the_norm_test_grows_the_batch_and_every_step_reads_what_it_asked_for(make_config):
    config = make_config(
        steps=12, eval_every=4, batch_growth="norm-test", batch_growth_theta=0.2,
        max_batch_size=64, schedule="constant",
    )  # fmt: skip
    result = train(config)
    assert result.status == "done", result.error
    changes = _extra(config)["batch_size_changes"]
    sizes = [_size_after(changes, step) for step in range(12)]
    assert sizes[0] == 16 and sizes == sorted(sizes) and 16 < sizes[-1] <= 64
    assert result.examples == sum(sizes)  # the stream read exactly what the controller set
    rows = read_metrics(config.out_dir)
    logged = [int(float(r["batch_size"])) for r in rows[1:]]
    assert logged == [_size_after(changes, s) for s in (4, 8, 12)]
    assert all(float(r["test_ratio"]) > 0 for r in rows[1:])
    # the statistics pass gave the gradient (the cheap path): b example gradients per step
    assert float(rows[-1]["example_gradients"]) == result.examples
    assert result.extra["gradient_evaluations"] == 12


@pytest.mark.parametrize("test", ["norm-test", "inner-product-test"])
def test_a_test_that_never_grows_steps_exactly_as_plain_sgd(make_config, test):
    """theta = 1e6: the batch stays. The norm test's gradient comes from the statistics pass
    (vmap), the inner-product test's from the backward pass before its own statistics:
    both end where plain SGD ends; a run at another batch size does not."""
    common = dict(steps=8, schedule="constant")
    grown = train(make_config(test, batch_growth=test, batch_growth_theta=1e6, **common))
    plain = train(make_config("plain", **common))
    train(make_config("other", batch_size=32, **common))
    assert grown.examples == plain.examples == 8 * 16
    params = {
        r: final_checkpoint(make_config(r).out_dir)["model"] for r in (test, "plain", "other")
    }
    assert_same_params(params[test], params["plain"], atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_params(params["other"], params["plain"], atol=1e-6)


def test_increase_instead_of_decay_passes_the_rest_to_the_learning_rate(make_config):
    """Milestones at steps 4 and 8, factor 2, the batch capped at 32: the batch doubles at 4;
    at 8 it cannot, so the learning rate halves instead (the ``lr`` column is the rate of the
    next update)."""
    config = make_config(
        steps=12, eval_every=4, schedule="constant", batch_growth="increase-instead-of-decay",
        batch_growth_options={"milestones": (4, 8), "factor": 2.0}, max_batch_size=32,
    )  # fmt: skip
    result = train(config)
    assert result.status == "done", result.error
    assert result.examples == 4 * 16 + 8 * 32
    rows = read_metrics(config.out_dir)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == lrs[1] and lrs[2] == lrs[3] == pytest.approx(lrs[0] / 2)
    assert [float(r["lr_scale"]) for r in rows[1:]] == [1.0, 0.5, 0.5]
    groups = final_checkpoint(config.out_dir)["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(lrs[0] / 2) for g in groups)


def test_an_epochs_budget_with_batch_growth_counts_examples(make_config):
    """2 epochs of the 128-example set at batch 16 are 256 examples: the run stops once it has
    read them, after fewer steps than batch 16 would take, and evaluates every 2 batches of 16
    examples' worth (whatever the steps' sizes)."""
    config = make_config(
        steps=None, epochs=2, schedule="constant", batch_growth="geometric", eval_every=2,
        batch_growth_options={"factor": 1.5}, max_batch_size=64,
    )  # fmt: skip
    result = train(config)
    assert result.status == "done", result.error
    sizes = [_size_after(_extra(config)["batch_size_changes"], s) for s in range(result.steps)]
    assert result.examples == sum(sizes) >= 256 > sum(sizes[:-1])
    assert result.steps < 16
    rows = read_metrics(config.out_dir)
    assert float(rows[-1]["epoch"]) == pytest.approx(result.examples / 128)
    read = [int(r["examples"]) for r in rows]
    crossed = [0] + [
        sum(sizes[: s + 1])
        for s in range(len(sizes))
        if sum(sizes[: s + 1]) // 32 > sum(sizes[:s]) // 32
    ]
    assert read == crossed  # one row per 32 examples passed, and the last step's


def test_batch_sizes_csv_has_every_step_and_a_resumed_run_writes_the_same(make_config):
    """One row per optimizer step: the batch it used (as the change points say), the test's
    ratio on tested steps only (every 2nd), and after a kill between an evaluation and the
    next checkpoint, the resumed run's file equals the uninterrupted one's."""
    settings = dict(
        steps=9, eval_every=4, checkpoint_every=3, schedule="constant", batch_growth="norm-test",
        batch_growth_theta=0.3, batch_growth_options={"every": 2}, max_batch_size=64,
    )  # fmt: skip
    reference = make_config("reference", **settings)
    assert train(reference).status == "done"
    rows = read_csv(Path(reference.out_dir) / "batch_sizes.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 10))
    changes = _extra(reference)["batch_size_changes"]
    assert [int(r["batch_size"]) for r in rows] == [_size_after(changes, s) for s in range(9)]
    assert [r["test_ratio"] != "" for r in rows] == [s % 2 == 0 for s in range(9)]

    killed = make_config("killed", **settings)
    assert train(killed, task=build(fail_after=7)).status == "failed"
    resumed = dataclasses.replace(killed, resume=True)
    assert train(resumed, task=build()).status == "done"
    assert read_csv(Path(killed.out_dir) / "batch_sizes.csv") == rows


# --- iterate averaging ------------------------------------------------------------------------


def _test_loss(weights: dict[str, torch.Tensor]) -> float:
    task = build()
    model = task.build_model()
    model.load_state_dict(weights)
    model.eval()
    inputs, targets = task.test.tensors
    with torch.no_grad():
        return F.cross_entropy(model(inputs), targets).item()


@pytest.mark.parametrize(
    ("kind", "decay", "weight_of_last"), [("polyak", 0.999, 0.5), ("ema", 0.25, 0.75)]
)
def test_the_averaged_model_is_evaluated_into_avg_columns(make_config, kind, decay, weight_of_last):
    """Averaging from step 4 of 6: the average of the iterates after steps 5 and 6 (uniform,
    or 0.25 / 0.75 for an EMA with decay 0.25), rebuilt here from the last two checkpoints."""
    config = make_config(
        steps=6, eval_every=2, checkpoint_every=1, averaging=kind, averaging_start=4,
        averaging_decay=decay,
    )  # fmt: skip
    assert train(config).status == "done"
    rows = read_metrics(config.out_dir)
    assert [r["avg_test_loss"] for r in rows[:3]] == ["", "", ""]  # nothing averaged by step 4
    fifth, sixth = (
        load_checkpoint(p)["model"] for p in list_checkpoints(Path(config.out_dir) / "checkpoints")
    )
    averaged = {k: (1 - weight_of_last) * fifth[k] + weight_of_last * sixth[k] for k in sixth}
    assert float(rows[-1]["avg_test_loss"]) == pytest.approx(_test_loss(averaged), rel=1e-5)
    assert float(rows[-1]["test_loss"]) != pytest.approx(_test_loss(averaged), rel=1e-5)
    assert _extra(config)["averaged_iterates"] == 2


# --- variance reduction -----------------------------------------------------------------------


def test_svrg_snapshots_are_full_passes_counted_as_n_example_gradients(make_config):
    """128 examples, batch 16, a snapshot every 4 steps: steps 0 and 4 snapshot."""
    config = make_config(optimizer="svrg", lr=None, optimizer_options={"inner_steps": 4}, steps=8)
    result = train(config)
    assert result.status == "done", result.error
    assert result.extra["example_gradients"] == 2 * 128 + 8 * 2 * 16
    assert result.extra["gradient_evaluations"] == 2 * (128 // 16) + 8 * 2
    assert result.extra["effective_passes"] == pytest.approx(512 / 128)
    assert float(read_metrics(config.out_dir)[-1]["opt_snapshots"]) == 2


def test_saga_gets_the_indices_of_the_examples_it_is_given(make_config):
    """One epoch with a step too small to move the weights: every table row is the gradient of
    its own example at the initial weights (computed here one example at a time)."""
    config = make_config(optimizer="saga", lr=1e-30, scaling="none", steps=8)
    assert train(config).status == "done"
    task = build()
    torch.manual_seed(config.seed)
    model = task.build_model()
    inputs, targets = task.train.tensors
    expected = per_example_gradients(model, F.cross_entropy, inputs, targets)
    state = final_checkpoint(config.out_dir)["optimizer"]["state"]
    tables = {state[i]["table"].shape[1:]: state[i]["table"] for i in range(4)}  # shapes differ
    for gradient in expected:
        torch.testing.assert_close(tables[gradient.shape[1:]], gradient, rtol=1e-5, atol=1e-7)
    assert state["saga"]["seen"].all()
    first = expected[0]
    shuffled = first[torch.randperm(len(first))]  # negative control: rows of other examples
    assert not torch.allclose(tables[first.shape[1:]], shuffled, atol=1e-4)


# --- refused settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_growth_theta": 0.5}, "set batch_growth to use them"),
        ({"batch_growth": "norm-tests"}, "'norm-tests'.*norm-test"),
        ({"batch_growth": "norm-test", "batch_growth_options": {"thetta": 1}}, "'thetta'"),
        ({"batch_growth": "geometric", "batch_growth_theta": 0.5}, "'theta' for 'geometric'"),
        ({"batch_growth": "norm-test", "batch_growth_theta": -1.0}, "theta value: -1.0"),
        ({"batch_growth": "norm-test", "max_batch_size": 8}, "max_batch_size: 8"),
        ({"batch_growth": "norm-test", "steps": None, "epochs": 1.0}, "schedule: 'cosine'"),
        ({"batch_growth": "norm-test", "noise_scale": True}, "noise_scale=True"),
        (
            {"batch_growth": "norm-test", "batch_growth_options": {"group_size": 0}},
            "group_size value: 0",
        ),
        ({"hessian_batch_size": 0}, "hessian_batch_size: 0"),
        ({"optimizer": "saga", "optimizer_options": {"num_examples": 5}}, "num_examples=5"),
        ({"averaging": "uniform"}, "'uniform'"),
        ({"averaging": "ema", "averaging_decay": 1.0}, "decay: 1.0"),
        ({"averaging_start": -1}, "start: -1"),
        ({"optimizer": "sgd", "hessian_batch_size": 8}, "'sgd' takes no Hessian sample"),
        ({"optimizer": "saga", "nproc": 2}, "runs in one process"),
        (
            {"batch_growth": "geometric", "scaling": "adascale", "accumulation_steps": 2},
            "scaling: 'adascale' with batch_growth='geometric'",
        ),
        ({"optimizer": "decentlam", "nproc": 2, "averaging": "ema"}, "averaging: 'ema' with"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(make_config, fields, message):
    with pytest.raises(ConfigError, match=message):
        make_config(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"optimizer": "newton-cg", "hessian_batch_size": 4096}, "larger than the training set"),
        ({"batch_growth": "norm-test", "max_batch_size": 4096}, "max_batch_size: 4096"),
    ],
)
def test_settings_that_need_the_data_or_the_optimizer_are_refused_before_anything_is_written(
    make_config, fields, message
):
    config = make_config(lr=None, **fields)
    with pytest.raises(ConfigError, match=message):
        check(config)  # what train and the launcher check before writing
    assert not Path(config.out_dir).exists()


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


@pytest.mark.parametrize("fields", [{"batch_growth": "norm-test"}, {"optimizer": "saga"}])
def test_per_example_gradients_of_a_batch_norm_model_are_refused_up_front(make_config, fields):
    task = dataclasses.replace(build(), build_model=BatchNormNet)
    config = make_config(**({"lr": None} | fields))
    with pytest.raises(ConfigError, match="batch norm"):
        train(config, task=task)
    assert not Path(config.out_dir).exists()


def test_the_command_line_sets_every_classical_option(tmp_path):
    out = tmp_path / "cli"
    args = [
        "run", "--task", TINY_TASK, "--batch-size", "16", "--steps", "4", "--no-progress",
        "--schedule", "constant", "--batch-growth", "norm-test", "--batch-growth-theta", "0.3",
        "--batch-growth-opt", "every=2", "--max-batch-size", "32", "--averaging", "ema",
        "--averaging-start", "1", "--averaging-decay", "0.9", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, env={"PYTHONPATH": str(HERE)})
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["batch_growth"] == "norm-test" and saved["batch_growth_theta"] == 0.3
    assert saved["batch_growth_options"] == {"every": 2} and saved["max_batch_size"] == 32
    assert (saved["averaging"], saved["averaging_start"], saved["averaging_decay"]) == (
        "ema",
        1,
        0.9,
    )
    refused = CliRunner().invoke(
        main, [*args[:-2], "--hessian-batch-size", "8", "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and "takes no Hessian sample" in refused.output
