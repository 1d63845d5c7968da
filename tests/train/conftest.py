"""Shared helpers for the training-engine tests: small runs of the tiny task."""

from __future__ import annotations

import pytest
from tiny_train_task import PROBE_SPEC, TINY_TASK

from largebatch.optim import registry
from largebatch.train import RunConfig


@pytest.fixture
def make_config(tmp_path):
    """``make_config(name, **fields)``: a fast RunConfig on the tiny task, in ``tmp_path/name``."""

    def make(name: str = "run", **fields) -> RunConfig:
        settings = dict(
            task=TINY_TASK, optimizer="sgd", lr=0.05, batch_size=16, steps=8,
            warmup_steps=0, out_dir=str(tmp_path / name),
        )  # fmt: skip
        settings.update(fields)
        return RunConfig(**settings)

    return make


@pytest.fixture
def probe_registered(monkeypatch):
    """The protocol-probe optimizer, registered for this test only."""
    monkeypatch.setitem(registry._REGISTRY, PROBE_SPEC.name, PROBE_SPEC)
