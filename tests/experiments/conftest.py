"""Fixtures of the sweep, results-database and report tests (helpers: ``sweep_helpers.py``)."""

from __future__ import annotations

import pytest
from sweep_helpers import write_synthetic_sweep

from largebatch.tasks.cache import CACHE_ENV


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "largebatch-cache"))


@pytest.fixture
def synthetic_sweep(tmp_path):
    """A sweep directory of 2 optimizers x 4 batch sizes x 2 lrs x 2 seeds, one diverged run."""
    return write_synthetic_sweep(tmp_path / "synthetic")
