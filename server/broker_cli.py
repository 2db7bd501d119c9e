"""``edgefleet broker``: run Mosquitto with the data directory's broker configuration (a single-box install)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click

from server.broker import find_mosquitto
from server.broker_identities import sync_broker
from server.broker_setup import BrokerLayout, BrokerSettings, mosquitto_config, parse_listen
from server.cli_options import DATA_DIR, given_db_url
from server.setup import open_workspace
from shared.files import atomic_write_bytes


@click.command("broker")
@DATA_DIR
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Where to listen [default: what 'edgefleet init' chose, see DATA_DIR/broker/broker.toml]; "
                   "kept for the device configs written afterwards.")
def broker_command(data_dir: Path, listen: str | None) -> None:
    """Run Mosquitto 2 for this data directory: per-device identities and topic ACLs, anonymous access off,
    TLS with the fleet CA unless init chose --no-tls. It becomes the Mosquitto process (stop it with Ctrl-C
    or SIGTERM); registering or removing a device makes it re-read its identities at once."""
    workspace = open_workspace(data_dir, db_url=given_db_url())
    layout = BrokerLayout(workspace.data_dir.broker)
    if not layout.exists():
        raise click.ClickException(f"{data_dir} has no broker set up: run 'edgefleet init --data-dir {data_dir}'")
    settings = BrokerSettings.load(layout)
    if listen is not None:
        host, port = parse_listen(listen)
        if port != settings.port:
            click.echo(f"note: device configs written earlier name port {settings.port}; this broker listens on "
                       f"{port}", err=True)
        settings = replace(settings, listen_host=host, port=port)
        atomic_write_bytes(layout.settings, settings.to_toml().encode())
    binary = find_mosquitto()
    layout.persistence.mkdir(parents=True, exist_ok=True)
    config = mosquitto_config(layout, settings, listen_host=settings.listen_host, port=settings.port)
    atomic_write_bytes(layout.config, config.encode())
    sync_broker(workspace.db, layout)
    click.echo(f"broker for {workspace.data_dir.root} on {settings.listen_host}:{settings.port} "
               f"({'TLS' if settings.tls else 'no TLS'}{', client certificates' if settings.client_certificates else ''}"
               f"); devices connect to {settings.device_url()}; log {layout.log}", err=True)
    os.execv(binary, [binary, "-c", str(layout.config)])
