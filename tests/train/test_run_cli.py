"""``largebatch run`` and ``largebatch list``: parsing, errors naming the bad value, listings."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny_train_task import TINY_TASK

from largebatch.cli import main
from largebatch.cli.common import parse_value
from largebatch.optim import list_optimizers
from largebatch.tasks import list_tasks


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def tiny_args(tmp_path):
    out = str(tmp_path / "r")
    return ["run", "--task", TINY_TASK, "--batch-size", "16", "--no-progress", "--out", out]


@pytest.mark.parametrize(
    ("text", "value"),
    [("0.9", 0.9), ("3", 3), ("(0.9, 0.99)", (0.9, 0.99)), ("true", True), ("False", False),
     ("none", None), ("extragradient", "extragradient")],
)  # fmt: skip
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_run_writes_a_run_directory_and_summary(tmp_path, tiny_args):
    result = invoke(
        *tiny_args,
        "--steps",
        "4",
        "--opt",
        "momentum=0.5",
        "--lr",
        "0.2",
        "--target",
        "accuracy=0.2",
    )
    assert result.exit_code == 0, result.output
    assert "done: 4 steps, 64 examples" in result.output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert saved["optimizer_options"] == {"momentum": 0.5}
    assert saved["lr"] == 0.2 and saved["target"] == ["accuracy", 0.2]
    assert json.loads((tmp_path / "r" / "result.json").read_text())["status"] == "done"


def test_failed_run_prints_where_its_traceback_is(tmp_path, tiny_args):
    result = invoke(*tiny_args, "--steps", "8", "--task-opt", "fail_after=3")
    assert result.exit_code == 1
    assert (
        "failed: 3 steps" in result.output and "error: RuntimeError: disk on fire" in result.output
    )
    log = tmp_path / "r" / "error.log"
    assert f"traceback: {log}" in result.output
    assert "Traceback (most recent call last)" in log.read_text()


def test_warmup_accepts_steps_and_epochs(tmp_path, tiny_args):
    assert invoke(*tiny_args, "--steps", "4", "--warmup", "2").exit_code == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert (saved["warmup_steps"], saved["warmup_epochs"]) == (2, None)
    out = str(tmp_path / "epochs")
    result = invoke(*tiny_args[:-1], out, "--epochs", "4", "--warmup", "0.5ep")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "epochs" / "config.json").read_text())
    assert saved["config"]["warmup_epochs"] == 0.5
    assert saved["plan"]["schedule"]["warmup_steps"] == 4  # 128 examples / 16 = 8 steps per epoch


def test_resume_continues_from_the_run_directory_config(tmp_path, tiny_args):
    assert invoke(*tiny_args, "--steps", "4").exit_code == 0
    resumed = invoke("run", "--out", str(tmp_path / "r"), "--resume", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "done: 4 steps" in resumed.output
    changed = invoke("run", "--out", str(tmp_path / "r"), "--resume", "--steps", "9")
    assert changed.exit_code == 2
    assert "config differs in steps" in changed.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "mnist1d-cnnn"], "Unknown task 'mnist1d-cnnn'. Did you mean 'mnist1d-cnn'?"),
        (["--optimizer", "adamm"], "Unknown optimizer 'adamm'. Did you mean 'adamw'?"),
        (["--batch-size", "0"], "Invalid batch_size: 0"),
        (["--batch-size", "-8"], "Invalid batch_size: -8"),
        (["--batch-size", "10", "--accumulation-steps", "3"], "Invalid batch_size: 10 is not divisible"),
        (["--batch-size", "1000"], "Invalid batch_size: 1000 is larger than the training set (128"),
        (["--warmup", "10"], "Invalid warm-up: 10 steps is not shorter than the run (4 steps)"),
        (["--warmup", "2ep"], "Invalid warm-up: 16 steps is not shorter than the run"),
        (["--warmup", "soon"], "'soon' is neither a number of steps"),
        (["--opt", "momentum"], "expected KEY=VALUE, got 'momentum'"),
        (["--opt", "lr=0.1"], "Set the learning rate with lr (--lr)"),
        (["--opt", "momentun=0.9"], "unknown hyperparameter(s) ['momentun']"),
        (["--task", "teacher-student", "--task-opt", "num_train=lots"],
         "Invalid value for task option 'num_train': 'lots'"),
        (["--steps", "5", "--epochs", "1"], "Set exactly one of epochs, steps, examples"),
        (["--target", "accuracy"], "expected NAME=VALUE with a number, got 'accuracy'"),
        (["--target", "f1=0.5"], "Invalid target metric: 'f1'"),
        (["--lr", "-1"], "Invalid learning rate: -1.0"),
        (["--epochs", "0"], "Invalid epochs: 0.0"),
        (["--examples", "0"], "Invalid examples: 0"),
        (["--scaling", "cubic"], "Invalid value for '--scaling'"),
    ],
)  # fmt: skip
def test_bad_values_get_an_error_naming_them(tiny_args, extra, message):
    budget = [] if {"--epochs", "--steps", "--examples"} & set(extra) else ["--steps", "4"]
    result = invoke(*tiny_args, *budget, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_unwritable_or_used_output_directory(tmp_path, tiny_args):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke(*tiny_args[:-1], str(blocker / "run"), "--steps", "4")
    assert result.exit_code == 2
    assert f"Output directory '{blocker / 'run'}' is not writable" in result.output
    assert invoke(*tiny_args, "--steps", "4").exit_code == 0
    again = invoke(*tiny_args, "--steps", "4")
    assert again.exit_code == 2 and "already holds a run" in again.output


def test_nproc_checks_before_launching(tiny_args):
    result = invoke(*tiny_args, "--steps", "4", "--nproc", "3")
    assert result.exit_code == 2
    assert "not divisible by nproc x accumulation_steps = 3 x 1" in result.output


def test_list_shows_every_registered_name_with_description_and_defaults():
    tasks = invoke("list", "tasks")
    assert tasks.exit_code == 0
    for spec in list_tasks():
        assert spec.name in tasks.output and spec.description in tasks.output
    assert "num_samples=12000" in tasks.output
    optimizers = invoke("list", "optimizers")
    assert optimizers.exit_code == 0
    for spec in list_optimizers():
        assert spec.name in optimizers.output and spec.description in optimizers.output
    assert "momentum=0.9" in optimizers.output and "lr scaling: linear" in optimizers.output
    assert invoke("list", "gizmos").exit_code == 2
