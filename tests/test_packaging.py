"""Packaging: every optional extra is installed where the tests run, so each integration is tested."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


@pytest.mark.parametrize(
    "requirement", [req for reqs in EXTRAS.values() for req in reqs], ids=lambda r: r
)
def test_every_optional_dependency_is_installed(requirement):
    """`make test` (and so CI) installs every extra: a missing one means an untested integration."""
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} (from the extras in pyproject.toml) is not installed")
