"""Optimizer tests compile every tensor, however small.

The compiled path sends tensors below ``COMPILE_MIN_NUMEL`` elements to the
multi-tensor step (see ``largebatch.optim._base``); the test problems are small,
so without this the compiled code would never run. ``test_compiled_routing.py``
checks the routing itself.
"""

import pytest

import largebatch.optim._base as base


@pytest.fixture(autouse=True)
def compile_every_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "COMPILE_MIN_NUMEL", 0)
