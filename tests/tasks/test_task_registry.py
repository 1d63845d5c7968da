"""Task lookup by name: the registry, option validation, and user tasks given as module:function."""

import sys
from pathlib import Path

import pytest
import torch

from largebatch.optim.registry import unknown_name_message
from largebatch.tasks import Task, get_task, list_tasks
from largebatch.tasks.registry import get_spec

BUILTIN = {
    "mnist1d-cnn",
    "mnist1d-mlp",
    "digits-cnn",
    "teacher-student",
    "logreg",
    "modadd-transformer",
}


def test_list_tasks_has_every_builtin_with_options_and_description():
    specs = {spec.name: spec for spec in list_tasks()}
    assert set(specs) == BUILTIN
    assert list_tasks()[0].name == "mnist1d-cnn"  # the default task comes first
    for spec in specs.values():
        assert spec.description
        assert "seed" in spec.options
        assert "val_fraction" in spec.options
    assert specs["mnist1d-cnn"].options["num_samples"] == 12_000
    assert specs["mnist1d-cnn"].options["test_fraction"] == 0.2
    assert specs["modadd-transformer"].options["modulus"] == 97
    assert "label_noise" in specs["teacher-student"].options


def test_task_description_comes_from_the_registry():
    task = get_task("teacher-student", num_train=50, num_test=20)
    assert task.description == get_spec("teacher-student").description
    assert task.name == "teacher-student"


def test_unknown_task_lists_valid_names_and_suggests_closest():
    with pytest.raises(KeyError) as info:
        get_task("mnist1d-cn")
    message = info.value.args[0]
    assert message == unknown_name_message("task", "mnist1d-cn", BUILTIN)
    assert "Did you mean 'mnist1d-cnn'?" in message
    assert "logreg" in message


def test_unknown_option_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"'num_sample'.*Valid options: num_samples"):
        get_task("mnist1d-cnn", num_sample=100)


@pytest.mark.parametrize(
    ("name", "options", "bad"),
    [
        ("mnist1d-cnn", {"num_samples": 0}, "num_samples"),
        ("mnist1d-cnn", {"num_samples": "many"}, "num_samples"),
        ("mnist1d-cnn", {"test_fraction": 1.5}, "test_fraction"),
        ("mnist1d-mlp", {"val_fraction": -0.1}, "val_fraction"),
        ("digits-cnn", {"seed": -1}, "seed"),
        ("teacher-student", {"label_noise": 1.0}, "label_noise"),
        ("teacher-student", {"num_classes": 1}, "num_classes"),
        ("logreg", {"doc_length": 0.0}, "doc_length"),
        ("logreg", {"num_classes": 1}, "num_classes"),
        ("modadd-transformer", {"n_heads": 3}, "n_heads"),
        ("modadd-transformer", {"train_fraction": 0.0}, "train_fraction"),
        ("modadd-transformer", {"d_model": 2.5}, "d_model"),
        ("logreg", {"num_features": True}, "num_features"),
    ],
)
def test_bad_option_value_is_named(name, options, bad):
    with pytest.raises(ValueError, match=bad):
        get_task(name, **options)


def test_command_line_strings_are_converted_to_the_option_types():
    from_strings = get_task(
        "teacher-student", num_train="40", num_test="1_0", label_noise="0.5", seed="3"
    )
    from_values = get_task("teacher-student", num_train=40, num_test=10, label_noise=0.5, seed=3)
    for a, b in zip(from_strings.train.tensors, from_values.train.tensors):
        assert torch.equal(a, b)
    assert len(from_strings.test) == 10


# --- user tasks: "package.module:function" -----------------------------------------


@pytest.fixture
def user_module_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_user_task_is_built_with_its_options(user_module_path):
    task = get_task("example_user_task:build", num_examples=10, dim=5)
    assert isinstance(task, Task)
    assert task.name == "example_user_task:build"
    assert len(task.train) == 10
    assert task.build_model()(task.train.tensors[0]).shape == (10, 2)


def test_user_task_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "cwd_task_module.py").write_text(
        (Path(__file__).parent / "example_user_task.py").read_text()
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert len(get_task("cwd_task_module:build").train) == 64


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        ("no_such_module_xyz:build", ImportError, "Cannot import module 'no_such_module_xyz'"),
        ("example_user_task:missing", ImportError, "has no attribute 'missing'"),
        ("example_user_task:NOT_A_FUNCTION", TypeError, "not callable"),
        ("example_user_task:returns_wrong_type", TypeError, "returned dict"),
        ("example_user_task:", ValueError, "expected 'package.module:function'"),
        (":build", ValueError, "expected 'package.module:function'"),
    ],
)
def test_user_task_errors_are_clear(user_module_path, target, error, match):
    with pytest.raises(error, match=match):
        get_task(target)


def test_user_task_option_that_its_function_does_not_take_is_named(user_module_path):
    with pytest.raises(ValueError, match="num_exampels"):
        get_task("example_user_task:build", num_exampels=10)
