"""The ``largebatch`` command line.

Subcommands live in their own modules and are imported only when invoked, so
``largebatch --help`` stays fast and a broken optional dependency of one command
does not break the others.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of a click command
COMMANDS = {
    "run": "largebatch.cli.run:run",
    "list": "largebatch.cli.run:list_cmd",
    "sweep": "largebatch.cli.sweep:sweep",
    "results": "largebatch.cli.sweep:results",
    "report": "largebatch.cli.sweep:report_cmd",
    "demo": "largebatch.cli.study:demo",
    "study": "largebatch.cli.study:study",
    "diagnose": "largebatch.cli.diagnose:diagnose",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="largebatch")
def main() -> None:
    """Large-batch training: optimizers, batch-size studies and diagnostics."""
