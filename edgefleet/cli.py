"""The ``edgefleet`` command.

Subcommands load lazily, so ``edgefleet agent`` on a Pi needs only
``edgefleet[agent]`` and never imports the server's TensorFlow or SQLAlchemy.
Every EdgefleetError becomes a one-line message and exit code 1; only a
programming error shows a traceback.

Logging goes to stderr at ``--log-level`` (or ``EDGEFLEET_LOG_LEVEL``). Left
to the default, the commands that run until stopped log at info, so that an
operator sees them connect to the broker, or fail to, and what they do;
everything else stays at warning. ``edgefleet server`` is decided here;
``edgefleet agent --config`` raises its own level the same way
(``agent/cli.py``), since ``agent status`` and ``agent check-config`` are not
long-running.

TensorFlow, absl and CUDA print start-up noise ("Could not find cuda
drivers", ``cuInit`` errors, oneDNN notices) that an operator has no use
for: ``shared.startup_noise`` keeps it off the terminal, decided here before
any command imports TensorFlow, unless ``--verbose`` (or ``--log-level debug``).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click
from click.core import ParameterSource

from shared import startup_noise
from shared.errors import EdgefleetError, RuntimeMissingError

# name -> (module, attribute, short help): the help text is here so ``--help`` imports nothing heavy.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("server.cli", "init_command", "Create keys, the root of trust and the database in a data directory."),
    "server": ("server.cli", "server_command", "Run the server until stopped."),
    "broker": ("server.broker_cli", "broker_command", "Run the fleet's Mosquitto (identities, ACLs, TLS)."),
    "device": ("server.device_cli", "device_group", "Register, tag, remove and list devices."),
    "model": ("server.cli", "model_group", "Add models and list their versions."),
    "profile": ("server.profile_cli", "profile_group", "Add, list and show device profiles."),
    "rollout": ("server.rollout_cli", "rollout_group", ("Roll models out in waves; status, pause, resume, abort, "
                "rollback.")),
    "events": ("server.rollout_cli", "events_command", "The audit log of rollout decisions and operator actions."),
    "token": ("server.token_cli", "token_group", "API tokens: create, list, revoke, rotate (read, operator, metrics)."),
    "latency": ("server.latency_cli", "latency_command", "Served latency over time: a device, profile or model version."),
    "keys": ("server.key_cli", "keys_group", "The signed root of trust: show it, rotate or revoke keys."),
    "release": ("server.release_cli", "release_group", "Releases signed with an offline key: prepare, sign, import."),
    "agent": ("agent.cli", "agent_group", "Run the device agent."),
    "simulate": ("agent.simulate.cli", "simulate_command", ("Run a fleet of simulated devices (the real agent, a "
                 "stand-in runtime).")),
    "top": ("server.top_cli", "top_command", "A live table of the devices: model version, p50/p95, calls/s."),
    "demo": ("server.demo", "demo_command", "Run a local demo fleet end to end."),
}


# Subcommands that run until stopped: at the default log level they log at info.
LONG_RUNNING = frozenset({"server"})


def log_level_chosen(ctx: click.Context) -> bool:
    """Whether the user chose the log level (``--log-level`` or ``EDGEFLEET_LOG_LEVEL``)."""
    return ctx.find_root().get_parameter_source("log_level") not in (ParameterSource.DEFAULT, None)


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
    default="warning",
    envvar="EDGEFLEET_LOG_LEVEL",
    show_envvar=True,
    show_default="warning; info for 'server' and 'agent --config', which run until stopped",
    help="Logging detail on stderr.",
)
@click.option(
    "--verbose", is_flag=True, envvar="EDGEFLEET_VERBOSE", show_envvar=True,
    help="Let TensorFlow, absl and CUDA print their start-up messages (implied by --log-level debug).",
)
@click.version_option(package_name="edgefleet")
@click.pass_context
def cli(ctx: click.Context, log_level: str, verbose: bool) -> None:
    """Compress models per device profile and roll them out to edge fleets over MQTT."""
    startup_noise.configure(verbose=verbose or log_level == "debug")  # before any command imports TensorFlow
    if ctx.invoked_subcommand in LONG_RUNNING and not log_level_chosen(ctx):
        log_level = "info"
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":
    main()
