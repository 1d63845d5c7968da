"""The ``largebatch`` command line.

Subcommands live in their own modules and are imported only when invoked, so
``largebatch --help`` stays fast (it imports neither the commands nor torch) and a
broken optional dependency of one command does not break the others.
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
    "lr-find": "largebatch.cli.lr_find:lr_find",
}

#: command name -> the first paragraph of its help, which ``largebatch --help`` lists
#: without importing the command (tests/cli keeps the two the same)
SUMMARIES = {
    "demo": "The default study: which optimizer keeps accuracy as the batch grows (= `study demo`).",
    "diagnose": "Sharpness, Hessian eigenvalues and trace of the model saved in CHECKPOINT.",
    "list": "List the registered tasks, optimizers, topologies or recipes (presets).",
    "lr-find": "Sweep the learning rate exponentially at one batch size and suggest one.",
    "report": "Write DIRECTORY/report.html and report.md from the sweep's results.",
    "results": "Print the runs recorded in DIRECTORY/results.sqlite.",
    "run": "Train one model and write its run directory (config, metrics, checkpoints, result).",
    "study": "Run study NAME into DIRECTORY (default studies/NAME); --list shows the studies.",
    "sweep": "Run a batch-size x optimizer x seed grid into DIRECTORY (default studies/sweep).",
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

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help``, from :data:`SUMMARIES` where they are given."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [
            (
                name,
                click.Command(name, help=SUMMARIES[name]).get_short_help_str(limit)
                if name in SUMMARIES
                else self.get_command(ctx, name).get_short_help_str(limit),
            )
            for name in names
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="largebatch")
def main() -> None:
    """Large-batch training: optimizers, batch-size studies and diagnostics."""
