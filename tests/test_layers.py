"""Imports point one way: ``utils`` < ``optim``, ``tasks`` < ``diagnostics`` < ``train`` <
``experiments`` < ``cli``. A module may import its own package and any package of a lower
layer, never a higher one nor a sibling of its own layer. The order is written once, in the
table of docs/architecture.md, and read from there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "largebatch"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def documented_layers(text: str) -> dict[str, int]:
    """package -> layer, from the rows ``| 3 | `largebatch.train` | ... |`` of the doc's table."""
    rows = re.findall(r"^\| (\d+) \| `largebatch\.(\w+)` \|", text, re.MULTILINE)
    return {package: int(layer) for layer, package in rows}


#: package -> layer; packages of the same layer may not import each other
LAYERS = documented_layers(ARCHITECTURE.read_text())


def _module_names(node: ast.AST, where: tuple[str, ...]) -> list[str]:
    """The dotted names ``node`` imports; ``where`` is the importing module's package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            base = node.module or ""
        elif node.level - 1 < len(where):  # relative: up level - 1 packages from ``where``
            base = ".".join([*where[: len(where) - node.level + 1], *filter(None, [node.module])])
        else:
            return []
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    if (  # importlib.import_module("largebatch.x") or import_module("largebatch.x")
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def imported_packages(source: str, where: tuple[str, ...] = ("largebatch",)) -> set[str]:
    """The ``largebatch.<package>`` names a module's source imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        for name in _module_names(node, where):
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
        relative = path.relative_to(root)
        package, where = relative.parts[0], ("largebatch", *relative.parent.parts)
        for imported in sorted(imported_packages(path.read_text(), where)):
            targets = top if imported == "largebatch" else {imported}
            for target in targets - {package}:
                if LAYERS[target] >= LAYERS[package]:
                    found.append(f"{path.relative_to(root.parent)} -> largebatch.{target}")
    return found


def test_the_layers_are_read_from_the_doc():
    assert documented_layers("| 2 | `largebatch.diagnostics` | measurements |") == {
        "diagnostics": 2
    }
    assert LAYERS["utils"] == 0 and LAYERS["optim"] == LAYERS["tasks"] < LAYERS["cli"]


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
        # relative imports, resolved from the planted module's package
        ("from ..train.config import RunConfig", "diagnostics", True),
        ("from .. import cli", "experiments", True),
        ("from ..utils import atomic", "optim", False),
        ("from . import sibling", "train", False),
        # modules imported by name
        ("import importlib\nimportlib.import_module('largebatch.cli.run')", "train", True),
        ("from importlib import import_module\nimport_module('largebatch.train')", "optim", True),
        ("import importlib\nimportlib.import_module('largebatch.utils.atomic')", "optim", False),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, source, package, bad):
    """Negative control: a planted module that imports upwards is reported."""
    (tmp_path / "__init__.py").write_text("from largebatch.optim import create_optimizer\n")
    (tmp_path / package).mkdir()
    (tmp_path / package / "planted.py").write_text(source + "\n")
    assert bool(violations(tmp_path)) == bad
