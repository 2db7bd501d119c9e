"""``edgefleet agent``: run the device agent, or check its configuration offline."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

import click

from agent.config import AgentConfig, load_config
from shared.interpreter import runtime_info

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The agent.toml written by 'edgefleet device register'.",
)


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
    """Run the agent: install signed models, benchmark them, report."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("missing --config agent.toml")
    from agent.service import AgentService

    config = load_config(config_path)
    _prefix_logs(config)
    service = AgentService(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()


@agent_group.command("check-config")
@CONFIG_OPTION
def check_config(config_path: Path) -> None:
    """Check agent.toml offline: keys, broker address, runtime."""
    config = load_config(config_path)
    runtime = runtime_info(config.runtime.preferred or None)
    click.echo(f"device   {config.device.name} ({config.device.id}), profile {config.device.profile}")
    click.echo(f"broker   {config.broker_address().url()}")
    click.echo(f"keys     {len(config.keys.release)} release, {len(config.keys.director)} director")
    click.echo(f"runtime  {runtime.name} {runtime.version}")
    click.echo(f"data     {config.data_dir}")
    click.echo("config OK")
