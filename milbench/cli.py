"""The ``milbench`` command line.

Heavy modules (torch, pandas, rich tables) are imported inside commands, and
built-in subcommands live in their own modules (:mod:`milbench.commands`),
imported only when the command line needs them, so ``milbench --help``
answers instantly. A command module that fails to import is a bug and
surfaces as one, never as a missing command. Plugins may add commands through the
``milbench_register_commands`` hook. A :class:`~milbench.errors.MilbenchError`
anywhere becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from milbench import __version__
from milbench.errors import MilbenchError

#: Built-in subcommands: name -> "module:attribute" (imported on first use).
BUILTIN_COMMANDS = {
    "run": "milbench.commands.run:run",
    "report": "milbench.commands.report:report",
    "list": "milbench.commands.inspect:list_cmd",
    "plugins": "milbench.commands.inspect:plugins_cmd",
    "data": "milbench.commands.data:data_group",
    "sweep": "milbench.commands.sweep:sweep",
    "tune": "milbench.commands.tune:tune",
    "plot": "milbench.commands.plot:plot",
    "compare": "milbench.commands.compare:compare",
}


class MilbenchGroup(click.Group):
    """A click group whose built-in commands and plugin commands load lazily."""

    _plugin_commands: dict[str, click.Command] | None = None

    def _plugins(self) -> dict[str, click.Command]:
        if self._plugin_commands is None:
            from milbench.plugins import get_registry

            collector = click.Group()
            for info, hook in get_registry().command_hooks:
                try:
                    hook(cli=collector)
                except Exception as exc:
                    info.status, info.error = "broken", f"milbench_register_commands raised {exc!r}"
                    click.echo(f"milbench: warning: plugin '{info.name}' commands skipped: {exc}", err=True)
            self._plugin_commands = {n: c for n, c in collector.commands.items() if n not in BUILTIN_COMMANDS}
        return self._plugin_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(BUILTIN_COMMANDS) + sorted(self._plugins())

    def _builtin(self, name: str) -> click.Command | None:
        """The built-in command ``name`` (its module imported now), or None if there is none."""
        target = BUILTIN_COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._builtin(name) or self._plugins().get(name)


@click.group(cls=MilbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="milbench")
def cli() -> None:
    """milbench — which memory-saving MIL method fits my data and my GPU?

    Train and evaluate methods on datasets, each run in a fresh process that
    writes one JSON record; compare the records in tables and plots.

    \b
    Quick start:
      milbench run -m abmil -d qmnist          # one run, one record
      milbench report                          # compare the records
      milbench list                            # methods and datasets
    """


def main(argv: list[str] | None = None) -> Any:
    """Entry point: one-line errors for bad input, 130 on Ctrl-C."""
    try:
        return cli.main(args=argv, prog_name="milbench", standalone_mode=False)
    except MilbenchError as exc:
        click.echo(f"milbench: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:
        cause = exc.__cause__ or exc.__context__
        record = getattr(cause, "record", None)
        if record is not None:  # a run was stopped; its record was written
            click.echo(f"milbench: interrupted: {record.get('error')} (record {record['run_id']})", err=True)
        else:
            click.echo("milbench: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("milbench: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
