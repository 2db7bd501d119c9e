"""``edgefleet agent``: run the device agent, show its state, or check its configuration."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from types import FrameType

import click

from agent.config import AgentConfig, load_config
from edgefleet.cli import log_level_chosen
from shared.interpreter import runtime_info
from shared.mqtt import probe_broker

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The agent.toml written by 'edgefleet device register'.",
)

CONNECT_TIMEOUT_S = 5.0


def _prefix_logs(config: AgentConfig) -> None:
    """Every log line of this process names its device."""
    prefix = f"[{config.device.name} {config.device.id}] "
    for handler in logging.getLogger().handlers:
        fmt = (handler.formatter._fmt if handler.formatter else None) or "%(message)s"
        handler.setFormatter(logging.Formatter(fmt.replace("%(message)s", prefix + "%(message)s")))


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The agent.toml written by 'edgefleet device register'.")
@click.pass_context
def agent_group(ctx: click.Context, config_path: Path | None) -> None:
    """Run the agent: install signed models, benchmark them, report.

    It runs until stopped (SIGTERM, Ctrl-C) and logs at info unless --log-level
    or EDGEFLEET_LOG_LEVEL says otherwise: whether it reaches the broker, and
    every install step.
    """
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("missing --config agent.toml")
    from agent.service import AgentService

    if not log_level_chosen(ctx):
        logging.getLogger().setLevel(logging.INFO)
    config = load_config(config_path)
    _prefix_logs(config)
    service = AgentService(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()


@agent_group.command("check-config", short_help="Check agent.toml offline; --connect: reach the broker too.")
@CONFIG_OPTION
@click.option("--connect", is_flag=True,
              help="Also connect to the broker (MQTT 5) and disconnect; exit 1 if that fails.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=CONNECT_TIMEOUT_S, show_default=True,
              help="Seconds to wait for the broker with --connect.")
def check_config(config_path: Path, connect: bool, timeout: float) -> None:
    """Check agent.toml: keys, broker address, runtime, offline; with --connect, the broker too."""
    config = load_config(config_path)
    runtime = runtime_info(config.runtime.preferred or None)
    url = config.broker_address().url()
    click.echo(f"device   {config.device.name} ({config.device.id}), profile {config.device.profile}")
    click.echo(f"broker   {url}")
    click.echo(f"keys     {len(config.keys.release)} release, {len(config.keys.director)} director")
    click.echo(f"runtime  {runtime.name} {runtime.version}")
    click.echo(f"data     {config.data_dir}")
    if connect:
        # Its own client id: connecting under the agent's would take over a running agent's connection.
        probe_broker(config.broker_address(), client_id=f"ef-check-{config.device.id}", timeout=timeout)
        click.echo(f"broker   connected to {url}")
    click.echo("config OK")


STATUS_JSON_HELP = """\
Show what the agent holds on disk, read-only, without a broker: the two model
slots, the committed model and the deployment that installed it, the last
update, the trusted state and the reports waiting in the outbox. A file that
is missing or corrupt shows as a line saying so.

\b
--json prints one object:
  device         {id, name, profile} from the config
  data_dir       the agent's data directory; data_dir_exists: bool
  active_slot    "a", "b" or null
  slots          {"a": SLOT, "b": SLOT}; SLOT has slot, active (bool) and
                 state: "empty", "partial" (half staged), "unreadable" or
                 "model", which adds model, version, quantization,
                 model_sha256, size_bytes; error says what is wrong, if anything
  committed      null (no model yet) or {slot, model, version, quantization,
                 model_sha256, deployment_id (the one that installed it)}
  update         the last update record: {state, deployment_id, outcome,
                 reason}
  trusted        {release_counter, directive_seq, deployment_id}
  outbox         {waiting: reports not yet acknowledged by the server}
committed, update, trusted and outbox are {error: "..."} when unreadable.
"""


@agent_group.command("status", help=STATUS_JSON_HELP,
                     short_help="Slots, committed model, last update, trust, outbox: from disk.")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines (keys above).")
def status_command(config_path: Path, as_json: bool) -> None:
    from agent.status import read_status, status_lines

    status = read_status(load_config(config_path))
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        for line in status_lines(status):
            click.echo(line)
