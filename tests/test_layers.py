"""Imports point one way: ``utils`` < ``optim``, ``tasks`` < ``diagnostics`` < ``train`` <
``experiments`` < ``cli`` (docs/architecture.md). A module may import its own package and
any package of a lower layer, never a higher one nor a sibling of its own layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "largebatch"
#: package -> layer; packages of the same layer may not import each other
LAYERS = {
    "utils": 0,
    "optim": 1,
    "tasks": 1,
    "diagnostics": 2,
    "train": 3,
    "experiments": 4,
    "cli": 5,
}


def imported_packages(source: str) -> set[str]:
    """The ``largebatch.<package>`` names a module's source imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "largebatch" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
            elif name == "largebatch":
                found.add("largebatch")
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    """``module -> package`` for every import that goes up a layer or sideways."""
    # the top-level package re-exports some names; importing it counts as importing those
    top = imported_packages((root / "__init__.py").read_text()) - {"largebatch"}
    found = []
    for path in sorted(root.glob("*/**/*.py")):
        package = path.relative_to(root).parts[0]
        for imported in sorted(imported_packages(path.read_text())):
            targets = top if imported == "largebatch" else {imported}
            for target in targets - {package}:
                if LAYERS[target] >= LAYERS[package]:
                    found.append(f"{path.relative_to(root.parent)} -> largebatch.{target}")
    return found


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


def test_no_module_imports_a_higher_or_sibling_layer():
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "package", "bad"),
    [
        ("from largebatch.train.config import RunConfig", "diagnostics", True),
        ("def f():\n    import largebatch.cli.run", "experiments", True),  # lazy imports count
        ("from largebatch.optim import registry", "tasks", True),  # siblings
        ("from largebatch import train", "utils", True),
        ("from largebatch.diagnostics import evaluate", "train", False),
        ("from largebatch.utils.atomic import write_json_atomic", "optim", False),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, source, package, bad):
    """Negative control: a planted module that imports upwards is reported."""
    (tmp_path / "__init__.py").write_text("from largebatch.optim import create_optimizer\n")
    (tmp_path / package).mkdir()
    (tmp_path / package / "planted.py").write_text(source + "\n")
    assert bool(violations(tmp_path)) == bad
