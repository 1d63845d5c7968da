"""Deep equality of optimizer state dicts (nested dicts, lists, tensors and plain values)."""

from __future__ import annotations

import torch


def assert_same(saved, loaded) -> None:
    """Nested dicts/lists of tensors and plain values are equal (tensors bit for bit)."""
    if isinstance(saved, dict):
        assert saved.keys() == loaded.keys()
        for key in saved:
            assert_same(saved[key], loaded[key])
    elif isinstance(saved, list | tuple):
        assert len(saved) == len(loaded)
        for a, b in zip(saved, loaded):
            assert_same(a, b)
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(saved, loaded)
    else:
        assert saved == loaded
