"""Atomic writes: the old content survives a failed write, and no temporary file is left."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from largebatch.utils.atomic import (
    atomic_write,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "file"
    write_bytes_atomic(target, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    monkeypatch.undo()
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"


def test_an_exception_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "data.npz"
    with atomic_write(target) as file:
        np.savez(file, x=np.arange(3))
    with pytest.raises(RuntimeError, match="interrupted"), atomic_write(target) as file:
        file.write(b"partial")
        raise RuntimeError("interrupted")
    with np.load(target) as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]


def test_text_and_json_round_trip_with_readable_permissions(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    value = {"b": [1, 2.5, None], "a": "x"}
    write_json_atomic(tmp_path / "v.json", value)
    assert json.loads((tmp_path / "v.json").read_text()) == value
    assert stat.S_IMODE((tmp_path / "v.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Invalid mode: 'a'"), atomic_write(tmp_path / "f", "a"):
        pass
