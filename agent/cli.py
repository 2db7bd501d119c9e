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
from shared.root import read_root_file
from shared.serve_address import DEFAULT_SERVE_LISTEN, ServeAddress

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
    run_agent(ctx, config_path)


def run_agent(ctx: click.Context, config_path: Path) -> None:
    """Run the agent of ``config_path`` until SIGTERM or Ctrl-C."""
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


@agent_group.command("enrol", short_help="Redeem an enrolment token: write agent.toml, then run the agent.")
@click.option("--server", required=True, metavar="URL", help="The server's https:// address (its --http).")
@click.option("--token", required=True, help="The one-time token 'edgefleet device register --token' printed.")
@click.option("--data-dir", "data_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="This device's agent directory: agent.toml, its certificates and its model slots go here.")
@click.option("--serve-listen", default=DEFAULT_SERVE_LISTEN, show_default=True,
              help="Where the agent serves its model: HOST:PORT or unix:/path.")
@click.option("--start/--no-start", default=True, show_default=True, help="Run the agent once enrolled.")
@click.pass_context
def enrol_command(ctx: click.Context, server: str, token: str, data_dir: Path, serve_listen: str, start: bool) -> None:
    """Enrol this device with a one-time token: check the server's CA against the token, get this device's
    broker identity, pinned keys and a client certificate (its key stays here), write agent.toml (0600), and
    run the agent."""
    from agent.enrol import enrol

    try:
        ServeAddress.parse(serve_listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--serve-listen") from None
    config_path = enrol(server, token, data_dir.resolve(), serve_listen=serve_listen)
    click.echo(f"enrolled: {config_path}")
    if start:
        run_agent(ctx, config_path)


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
    if config.keys.uses_root:
        root, _ = read_root_file(Path(config.keys.root_file))
        click.echo(f"keys     root of trust v{root.version} from {config.keys.root_file} (follows rotations)")
    else:
        click.echo(f"keys     {len(config.keys.release)} release, {len(config.keys.director)} director pinned "
                   "(no rotation)")
    click.echo(f"runtime  {runtime.name} {runtime.version}")
    click.echo(f"data     {config.data_dir}")
    click.echo(f"serve    {config.serve.listen if config.serve.enabled else 'off'}")
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
  root           the root of trust: {version, expires (unix s), source:
                 "config" (root_file) or "data_dir" (received since)};
                 with pinned keys {version: null, pinned: {release,
                 director}: how many}
  outbox         {waiting: reports not yet acknowledged by the server}
  serve          {enabled, listen (configured), address: where the running
                 agent serves inference (http://HOST:PORT or unix:/path),
                 null when it is not running}
committed, update, trusted, root, outbox and serve are {error: "..."} when
unreadable.
"""


@agent_group.command("status", help=STATUS_JSON_HELP,
                     short_help="Slots, committed model, last update, trust, outbox, serve address: from disk.")
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
