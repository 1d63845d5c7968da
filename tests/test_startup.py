"""Start-up: ``largebatch --help`` imports no torch, and training imports no analysis library.

Each check runs a fresh interpreter and looks at ``sys.modules``; the timings are
in ``benchmarks/train_loop.py --startup`` and ``docs/performance.md``.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from largebatch.cli import COMMANDS, SUMMARIES, main

#: heavy libraries that only analysis (diagnostics, reports) needs
ANALYSIS = ("scipy", "matplotlib", "sklearn")


def modules_after(code: str) -> set[str]:
    """The top-level packages imported by a fresh interpreter that ran ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


def test_help_imports_neither_torch_nor_the_commands():
    code = "from largebatch.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass"
    imported = modules_after(code)
    assert "torch" not in imported and "click" in imported
    # the check can fail: a subcommand's help does import torch
    assert "torch" in modules_after(code.replace("['--help']", "['run', '--help']"))


def test_training_imports_no_analysis_library():
    imported = modules_after("import largebatch.cli.run, largebatch.train.loop")
    assert "torch" in imported
    assert imported.isdisjoint(ANALYSIS)
    assert "scipy" in modules_after("import largebatch.experiments.analysis")  # can fail


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_each_command_with_its_own_summary(name):
    """``SUMMARIES`` (shown by ``--help`` without importing) is the command's first paragraph."""
    assert name in SUMMARIES, f"add the first paragraph of {name!r}'s help to SUMMARIES"
    command = main.get_command(None, name)
    first_paragraph = inspect.cleandoc(command.help).split("\n\n")[0]
    assert SUMMARIES[name] == " ".join(first_paragraph.split())
