"""Scripted enrolment: register a numbered fleet of devices at once (``edgefleet device register-fleet``).

What ``edgefleet device register --out`` does for one device, done for many
with the costs paid once: one database transaction for every device, one
rewrite of the broker's password file at the end, one root of trust and one
CA file shared by all the configs in the output directory. Each device gets
its own broker identity and its own agent.toml (mode 0600), the same text the
single register writes (``server.devices.agent_config_toml``).

Files are claimed (created empty) before anything is registered, so a
directory that already holds one of the configs fails up front and leaves
nothing behind; a name already taken fails the transaction as a whole. A run
killed after claiming its files carries on when run again: a config still
empty is its own leftover, and its device, if the first run registered it,
gets a new broker password (the first one was never written down).
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
from shared.failpoints import failpoint
from shared.files import atomic_write_bytes
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
    leftovers = _claim_all(configs)
    failpoint("server.fleet.claimed")  # the configs claimed, nothing registered
    identities = [new_identity() if managed else ("", None) for _ in names]
    try:
        root = write_root_file(RootStore(workspace.data_dir.keys), out_dir / ROOT_FILE)
        devices = register_devices(workspace.db, names, profile, [hashed for _, hashed in identities],
                                   actor=audit.operator(), resume={p.stem for p in leftovers})
    except BaseException:
        for path in set(configs) - leftovers:  # an earlier run's leftovers stay, for the run that resumes it
            path.unlink(missing_ok=True)
        raise
    failpoint("server.fleet.registered")  # committed; the broker and the configs not written yet
    if managed:
        sync_broker(workspace.db, layout)  # once for the whole fleet: the running broker knows them all now
    for device, config, (password, _) in zip(devices, configs, identities):
        identity: str | BrokerIdentity = url
        if managed:
            identity = write_device_files(layout, device.id, device.name, password, url, out_dir)
        slots = ((agent_data_root / device.name) if agent_data_root else out_dir / f"{device.name}-data").resolve()
        _write_config(config, agent_config_toml(device, identity, slots, serve_listen=serve_listen))
    return FleetRegistration(devices, configs, url, root.version)


def _write_config(path: Path, text: str) -> None:
    """All of it or nothing, as far as a killed run is concerned: a temporary file renamed over the claim.
    (Not fsynced: thousands of configs would take minutes. After a power cut, a config the rename left
    empty is a leftover claim like any other, and a new run resumes it.)"""
    atomic_write_bytes(path, text.encode(), private=True, durable=False)


def _claim_all(paths: list[Path]) -> set[Path]:
    """Create every file empty with mode 0600, or none: a config that exists is never overwritten. An
    empty one is the claim of an earlier run that died before writing it: taken over, and returned."""
    existing = [p for p in paths if p.exists()]
    if written := [p for p in existing if p.stat().st_size > 0]:
        raise UserInputError(f"{written[0]} already exists ({len(written)} of the configs do): choose another "
                             "--out-dir or --prefix")
    leftovers = set(existing)
    claimed: list[Path] = []
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path in paths:
            if path not in leftovers:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                claimed.append(path)
    except OSError as exc:
        for path in claimed:
            path.unlink(missing_ok=True)
        raise UserInputError(f"cannot write the configs in {paths[0].parent}: {exc.strerror or exc}") from exc
    return leftovers
