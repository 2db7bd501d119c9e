"""The ``edgefleet`` command.

Subcommands load lazily, so ``edgefleet agent`` on a Pi needs only
``edgefleet[agent]`` and never imports the server's TensorFlow or SQLAlchemy.
Every EdgefleetError becomes a one-line message and exit code 1; only a
programming error shows a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from shared.errors import EdgefleetError, RuntimeMissingError

# name -> (module, attribute, short help): the help text is here so ``--help`` imports nothing heavy.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("server.cli", "init_command", "Create keys and the database in a data directory."),
    "server": ("server.cli", "server_command", "Run the server until stopped."),
    "device": ("server.device_cli", "device_group", "Register, tag, remove and list devices."),
    "model": ("server.cli", "model_group", "Add models and list their versions."),
    "profile": ("server.profile_cli", "profile_group", "Add, list and show device profiles."),
    "rollout": ("server.rollout_cli", "rollout_group", ("Roll models out in waves; status, pause, resume, abort, "
                "rollback.")),
    "events": ("server.rollout_cli", "events_command", "The audit log of rollout decisions and operator actions."),
    "agent": ("agent.cli", "agent_group", "Run the device agent."),
    "demo": ("server.demo", "demo_command", "Run a local demo fleet end to end."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[cmd_name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            extra = "agent" if module_name.startswith("agent") else "server"
            raise click.ClickException(
                f"'edgefleet {cmd_name}' needs more packages ({exc}): pip install 'edgefleet[{extra}]'"
            ) from exc
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, _, help_text) in COMMANDS.items()])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RuntimeMissingError as exc:
            raise click.ClickException(str(exc)) from exc
        except EdgefleetError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=LazyGroup)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=lambda: os.environ.get("EDGEFLEET_LOG_LEVEL", "warning"),
    show_default="warning",
    help="Logging detail on stderr.",
)
@click.version_option(package_name="edgefleet")
def cli(log_level: str) -> None:
    """Compress models per device profile and roll them out to edge fleets over MQTT."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":
    main()
