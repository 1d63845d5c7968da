"""MNIST-1D data equal the mnist1d package's generator and are cached on disk once, atomically."""

import random

import numpy as np
import pytest
import torch
from mnist1d.data import get_dataset_args, make_dataset

from largebatch.tasks import cache as cache_module
from largebatch.tasks import get_task
from largebatch.tasks import mnist1d as mnist1d_module
from largebatch.tasks.cache import CACHE_ENV

SMALL = {"num_samples": 300, "seed": 3}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def generation_calls(monkeypatch):
    calls = []
    real = mnist1d_module._generate

    def counting(args):
        calls.append(args)
        return real(args)

    monkeypatch.setattr(mnist1d_module, "_generate", counting)
    return calls


def test_data_equal_the_package_generator():
    task = get_task("mnist1d-cnn", **SMALL, test_fraction=0.25, val_fraction=0.0)
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = 300, 3, 0.75
    reference = make_dataset(args)
    assert torch.equal(task.train.tensors[0], torch.from_numpy(reference["x"].astype(np.float32)))
    assert torch.equal(task.train.tensors[1], torch.from_numpy(reference["y"]))
    assert torch.equal(
        task.test.tensors[0], torch.from_numpy(reference["x_test"].astype(np.float32))
    )
    assert len(task.train) == 225 and len(task.test) == 75


def test_cache_is_written_once_and_reused(fresh_cache, generation_calls):
    first = get_task("mnist1d-cnn", **SMALL)
    files = list(fresh_cache.iterdir())
    assert len(generation_calls) == 1
    assert len(files) == 1 and files[0].name.startswith("mnist1d-") and files[0].suffix == ".npz"
    stamp = files[0].stat().st_mtime_ns

    second = get_task("mnist1d-mlp", **SMALL)  # same data, other model: a cache hit
    assert len(generation_calls) == 1
    assert files[0].stat().st_mtime_ns == stamp
    for a, b in zip(
        first.train.tensors + first.test.tensors, second.train.tensors + second.test.tensors
    ):
        assert torch.equal(a, b)

    get_task("mnist1d-cnn", num_samples=300, seed=4)  # other generation args: a new file
    assert len(generation_calls) == 2
    assert len(list(fresh_cache.iterdir())) == 2


def test_corrupt_cache_file_is_regenerated(fresh_cache, generation_calls):
    good = get_task("mnist1d-cnn", **SMALL)
    (path,) = fresh_cache.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = get_task("mnist1d-cnn", **SMALL)
    assert len(generation_calls) == 2
    assert torch.equal(good.train.tensors[0], again.train.tensors[0])
    get_task("mnist1d-cnn", **SMALL)  # the file was rewritten whole
    assert len(generation_calls) == 2


def test_unwritable_cache_warns_and_still_returns_data(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    with pytest.warns(UserWarning, match="Could not cache"):
        task = get_task("mnist1d-cnn", **SMALL)
    assert len(task.test) == 60


def test_failed_write_leaves_no_file_behind(fresh_cache, monkeypatch):
    def failing_savez(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.np, "savez", failing_savez)
    with pytest.warns(UserWarning, match="disk full"):
        get_task("mnist1d-cnn", **SMALL)
    assert list(fresh_cache.iterdir()) == []


def test_generation_leaves_global_rng_state_alone(fresh_cache, generation_calls):
    random.seed(11)
    np.random.seed(11)  # noqa: NPY002 (the global state is what is checked)
    py_before, np_before = random.random(), np.random.rand()  # noqa: NPY002
    random.seed(11)
    np.random.seed(11)  # noqa: NPY002
    get_task("mnist1d-cnn", **SMALL)
    assert len(generation_calls) == 1
    assert random.random() == py_before
    assert np.random.rand() == np_before  # noqa: NPY002
