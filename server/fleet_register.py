"""Scripted enrolment: register a numbered fleet of devices at once (``edgefleet device register-fleet``).

What ``edgefleet device register --out`` does for one device, done for many
with the costs paid once: one database transaction for every device, one
rewrite of the broker's password file at the end, one root of trust and one
CA file shared by all the configs in the output directory. Each device gets
its own broker identity and its own agent.toml (mode 0600), the same text the
single register writes (``server.devices.agent_config_toml``).

Files are claimed before anything is registered, so a directory that already
holds one of the configs fails up front and leaves nothing behind; a name
already taken fails the transaction as a whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from server import audit
from server.broker_identities import new_identity, sync_broker, write_device_files
from server.broker_setup import BrokerLayout, BrokerSettings
from server.devices import DeviceRow, agent_config_toml, register_devices
from server.roots import ROOT_FILE, RootStore, write_root_file
from server.setup import Workspace
from shared.agent_toml import BrokerIdentity
from shared.errors import UserInputError
from shared.mqtt import BrokerAddress
from shared.serve_address import DEFAULT_SERVE_LISTEN

MAX_FLEET = 100_000


@dataclass(frozen=True)
class FleetRegistration:
    devices: list[DeviceRow]
    configs: list[Path]
    broker_url: str
    root_version: int


def fleet_names(prefix: str, count: int, start: int = 1) -> list[str]:
    """``prefix-00001`` ... : zero-padded so the names (and the config files) sort in order."""
    if not 1 <= count <= MAX_FLEET:
        raise UserInputError(f"--count must be between 1 and {MAX_FLEET}, got {count}")
    if start < 0:
        raise UserInputError(f"--start must be 0 or more, got {start}")
    width = max(5, len(str(start + count - 1)))
    return [f"{prefix}-{i:0{width}d}" for i in range(start, start + count)]


def register_fleet(
    workspace: Workspace, names: list[str], profile: str, out_dir: Path, *, broker: str | None = None,
    agent_data_root: Path | None = None, serve_listen: str = DEFAULT_SERVE_LISTEN,
) -> FleetRegistration:
    """Register ``names`` with ``profile`` and write ``out_dir/NAME.toml`` for each; all or nothing."""
    layout = BrokerLayout(workspace.data_dir.broker)
    managed = layout.exists()  # a broker whose identities this data directory keeps
    url = BrokerAddress.parse(broker or (BrokerSettings.load(layout).device_url() if managed
                                         else "mqtt://127.0.0.1:1883")).url()
    configs = [out_dir / f"{name}.toml" for name in names]
    _claim_all(configs)
    identities = [new_identity() if managed else ("", None) for _ in names]
    try:
        root = write_root_file(RootStore(workspace.data_dir.keys), out_dir / ROOT_FILE)
        devices = register_devices(workspace.db, names, profile, [hashed for _, hashed in identities],
                                   actor=audit.operator())
    except BaseException:
        for path in configs:
            path.unlink(missing_ok=True)
        raise
    if managed:
        sync_broker(workspace.db, layout)  # once for the whole fleet: the running broker knows them all now
    for device, config, (password, _) in zip(devices, configs, identities):
        identity: str | BrokerIdentity = url
        if managed:
            identity = write_device_files(layout, device.id, device.name, password, url, out_dir)
        slots = ((agent_data_root / device.name) if agent_data_root else out_dir / f"{device.name}-data").resolve()
        config.write_text(agent_config_toml(device, identity, slots, serve_listen=serve_listen), encoding="utf-8")
    return FleetRegistration(devices, configs, url, root.version)


def _claim_all(paths: list[Path]) -> None:
    """Create every file empty with mode 0600, or none: a config that exists is never overwritten."""
    if existing := [p for p in paths if p.exists()]:
        raise UserInputError(f"{existing[0]} already exists ({len(existing)} of the configs do): choose another "
                             "--out-dir or --prefix")
    claimed: list[Path] = []
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            claimed.append(path)
    except OSError as exc:
        for path in claimed:
            path.unlink(missing_ok=True)
        raise UserInputError(f"cannot write the configs in {paths[0].parent}: {exc.strerror or exc}") from exc
