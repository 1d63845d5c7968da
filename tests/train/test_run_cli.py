"""``largebatch run`` and ``largebatch list``: parsing, errors naming the bad value, listings."""

from __future__ import annotations

import json

import pytest
import torch
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
        (["--seed", "-1"], "Invalid seed: -1"),
        (["--opt", "momentum=abc"],
         "Invalid optimizer option momentum='abc': expected a number (default 0.9)"),
        (["--optimizer", "adamw", "--opt", "betas=0.9"],
         "Invalid optimizer option betas=0.9: expected a list of 2 values (default [0.9, 0.999])"),
        (["--opt", "lr=abc"], "Invalid optimizer option lr='abc'. Set the learning rate with lr"),
        (["--optimizer", "adamw", "--opt", "betas=(0.9, 1.5)"], "Invalid beta parameter"),
        (["--task-opt", "num_train=lots"], "Invalid value for task option 'num_train'"),
        (["--task", "no_such_module_xyz:build"], "Cannot import module 'no_such_module_xyz'"),
        (["--device", "cuda:99"], "Invalid device: 'cuda:99'"),
        (["--device", "tpu"], "Invalid device: 'tpu'"),
    ],
)  # fmt: skip
def test_bad_values_get_an_error_naming_them(tmp_path, tiny_args, extra, message):
    budget = [] if {"--epochs", "--steps", "--examples"} & set(extra) else ["--steps", "4"]
    result = invoke(*tiny_args, *budget, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # checked before anything is created


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, tiny_args):
    result = invoke(*tiny_args, "--steps", "4", "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert "Invalid device: 'cuda' (this torch has no CUDA support" in result.output or (
        "Invalid device: 'cuda' (this machine has 0 CUDA device(s)" in result.output
    )
    assert not (tmp_path / "r").exists()


def test_a_task_that_raises_is_a_one_line_error_naming_where(tmp_path, tiny_args):
    result = invoke(*tiny_args, "--steps", "4", "--task-opt", "broken=true")
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert f"Task '{TINY_TASK}' raised RuntimeError: the data server is down (" in line
    assert "tiny_train_task.py:" in line
    assert not (tmp_path / "r").exists()


def test_config_file_that_is_not_json_or_has_an_unknown_key(tmp_path, tiny_args):
    broken = tmp_path / "broken.json"
    broken.write_text("{'task': 'x'")
    result = invoke(*tiny_args, "--config", str(broken))
    assert result.exit_code == 2 and f"{broken} is not a JSON config" in result.output
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"config": {"task": TINY_TASK, "batch_sise": 16}}))
    result = invoke(*tiny_args, "--config", str(unknown))
    assert result.exit_code == 2, result.output
    assert "Unknown config key 'batch_sise'. Did you mean 'batch_size'?" in result.output
    assert not (tmp_path / "r").exists()


def test_a_diverged_run_says_where_and_exits_non_zero(tmp_path, tiny_args):
    """Which quantity became non-finite at which step, and whether the data is to blame."""
    result = invoke(*tiny_args, "--steps", "30", "--lr", "1e12", "--opt", "momentum=0.9")
    assert result.exit_code == 1, result.output
    assert "diverged: " in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert "non-finite loss by step " in line and ("is nan" in line or "is inf" in line)
    assert "input data finite" in line and "parameters non-finite" in line
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert saved["error"] == line.removeprefix("error: ")
    assert saved["extra"]["divergence"]["inputs_finite"] is True

    nan_data = invoke(*tiny_args[:-1], str(tmp_path / "nan"), "--steps", "4",
                      "--task-opt", "nan_inputs=true")  # fmt: skip
    assert nan_data.exit_code == 1, nan_data.output
    assert (
        "non-finite loss by step 0: the training-set loss evaluated at step 0 is non-finite "
        in (nan_data.output)
    )
    assert "parameters finite, training input data non-finite" in nan_data.output


def test_resume_when_every_checkpoint_is_corrupt(tmp_path, tiny_args):
    """One line, the files kept where they were (and named), never a silent restart."""
    assert invoke(*tiny_args, "--steps", "8", "--checkpoint-every", "4").exit_code == 0
    checkpoints = sorted((tmp_path / "r" / "checkpoints").iterdir())
    assert len(checkpoints) == 2
    for path in checkpoints:
        path.write_bytes(path.read_bytes()[:-10])
    metrics = (tmp_path / "r" / "metrics.csv").read_text()
    for _ in range(2):  # a second attempt fails the same way: nothing was renamed
        result = invoke("run", "--out", str(tmp_path / "r"), "--resume", "--no-progress")
        assert result.exit_code == 1, result.output
        (line,) = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert f"No usable checkpoint in {tmp_path / 'r' / 'checkpoints'}" in line
        assert all(path.name in line for path in checkpoints) and "left there" in line
        assert sorted((tmp_path / "r" / "checkpoints").iterdir()) == checkpoints
        assert (tmp_path / "r" / "metrics.csv").read_text() == metrics


def test_unwritable_or_used_output_directory(tmp_path, tiny_args):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke(*tiny_args[:-1], str(blocker / "run"), "--steps", "4")
    assert result.exit_code == 2
    assert f"Output directory '{blocker / 'run'}' is not writable" in result.output
    assert invoke(*tiny_args, "--steps", "4").exit_code == 0
    again = invoke(*tiny_args, "--steps", "4")
    assert again.exit_code == 2 and "already holds a run" in again.output


def test_nproc_checks_before_launching(tmp_path, tiny_args):
    result = invoke(*tiny_args, "--steps", "4", "--nproc", "3")
    assert result.exit_code == 2
    assert "not divisible by nproc x accumulation_steps = 3 x 1" in result.output
    for extra in (["--opt", "momentun=0.9"], ["--task-opt", "broken=true"], ["--warmup", "9"]):
        result = invoke(*tiny_args, "--steps", "4", "--nproc", "2", *extra)
        assert result.exit_code in (1, 2) and "Error" in result.output, result.output
        assert not (tmp_path / "r").exists()  # no worker started, nothing created


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
