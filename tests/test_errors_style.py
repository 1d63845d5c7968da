"""The error rule of docs/architecture.md: ``tasks``, ``train`` and ``experiments`` raise
the project's types (``ConfigError`` and friends) for a bad value, never a bare
``ValueError``, outside the named exemptions."""

from __future__ import annotations

import ast
from pathlib import Path

import largebatch

PACKAGE = Path(largebatch.__file__).parent
RULED = ("tasks", "train", "experiments")
#: (file, enclosing function or class) pairs allowed a bare ValueError, with the reason
EXEMPT = {
    # the controllers follow torch's schedulers; build_controller converts for runs
    ("train/batch_growth.py", "BatchSizeController"),
    ("train/batch_growth.py", "_AdaptiveTest"),
    ("train/batch_growth.py", "GeometricGrowth"),
    ("train/batch_growth.py", "IncreaseInsteadOfDecay"),
    ("train/batch_growth.py", "make_controller"),
    # raised to its caller, which catches it and raises ConfigError
    ("tasks/registry.py", "_parse_bool"),
}


def bare_value_errors(source: str) -> list[tuple[str, int]]:
    """``(outermost enclosing function or class, line)`` of every ``raise ValueError``."""
    found = []

    def visit(node: ast.AST, owner: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = owner
            if not owner and isinstance(child, ast.FunctionDef | ast.ClassDef):
                name = child.name
            if isinstance(child, ast.Raise) and child.exc is not None:
                raised = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(raised, ast.Name) and raised.id == "ValueError":
                    found.append((owner or "<module>", child.lineno))
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def test_ruled_packages_raise_the_projects_types():
    offenders = []
    for package in RULED:
        for path in sorted((PACKAGE / package).rglob("*.py")):
            relative = path.relative_to(PACKAGE).as_posix()
            for owner, line in bare_value_errors(path.read_text()):
                if (relative, owner) not in EXEMPT:
                    offenders.append(f"{relative}:{line} ({owner})")
    assert offenders == [], "bare ValueError (use ConfigError): " + ", ".join(offenders)


def test_every_exemption_still_raises_one():
    """An exemption whose code no longer raises a bare ValueError is stale."""
    used = set()
    for relative in {file for file, _ in EXEMPT}:
        owners = {owner for owner, _ in bare_value_errors((PACKAGE / relative).read_text())}
        used |= {(relative, owner) for owner in owners}
    assert not EXEMPT - used, sorted(EXEMPT - used)


def test_the_scan_finds_a_bare_value_error():
    """Negative control: nested raises are attributed to their outermost owner; a
    ConfigError or a re-raise is not counted."""
    source = (
        "def f(x):\n"
        "    def g():\n"
        "        raise ValueError('bad')\n"
        "    raise ConfigError('fine')\n"
        "class C:\n"
        "    def m(self):\n"
        "        raise ValueError\n"
        "def h():\n"
        "    try:\n"
        "        pass\n"
        "    except ValueError:\n"
        "        raise\n"
    )
    assert bare_value_errors(source) == [("f", 3), ("C", 7)]
