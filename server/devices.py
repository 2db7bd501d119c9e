"""Device registration and listing."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from server.db import Database, Session, queries
from server.db.models import Device, Profile
from server.keys import SigningKeys
from shared.errors import AlreadyExistsError, NotFoundError, UserInputError
from shared.signing import KeyRole

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class DeviceRow:
    id: str
    name: str
    profile: str
    online: bool
    runtime: str | None
    update_state: str | None
    active_model: str | None
    active_version: int | None
    active_quantization: str | None

    @classmethod
    def of(cls, device: Device) -> DeviceRow:
        return cls(
            id=device.id,
            name=device.name,
            profile=device.profile_name,
            online=device.online,
            runtime=device.runtime,
            update_state=device.update_state,
            active_model=device.active_model,
            active_version=device.active_version,
            active_quantization=device.active_quantization,
        )


def get_profile(session: Session, name: str) -> Profile:
    profile = session.get(Profile, name)
    if profile is None:
        known = ", ".join(queries.profile_names(session))
        raise NotFoundError(f"unknown profile {name!r}; known profiles: {known}")
    return profile


def register_device(db: Database, name: str, profile: str) -> DeviceRow:
    if not _NAME.match(name):
        raise UserInputError(
            f"invalid device name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    with db.session() as session:
        get_profile(session, profile)
        if queries.device_by_name(session, name) is not None:
            raise AlreadyExistsError(f"a device named {name!r} is already registered")
        device = Device(id=f"d-{secrets.token_hex(5)}", name=name, profile_name=profile)
        session.add(device)
        session.flush()
        return DeviceRow.of(device)


def list_devices(db: Database) -> list[DeviceRow]:
    with db.session() as session:
        return [DeviceRow.of(d) for d in queries.devices(session)]


def find_device(session: Session, name: str) -> Device:
    device = queries.device_by_name(session, name)
    if device is None:
        raise NotFoundError(f"unknown device {name!r}; 'edgefleet device list' shows the registered ones")
    return device


def agent_config_toml(device: DeviceRow, broker_url: str, keys: SigningKeys, agent_data_dir: Path) -> str:
    """The agent.toml that ``edgefleet agent --config`` reads; pins this server's public keys."""
    public = keys.public_texts()

    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    return "\n".join(
        [
            "# edgefleet agent configuration, written by 'edgefleet device register'",
            "[device]",
            f"id = {q(device.id)}",
            f"name = {q(device.name)}",
            f"profile = {q(device.profile)}",
            "",
            "[broker]",
            f"url = {q(broker_url)}",
            "",
            "[keys]  # pinned public keys; list several per role to rotate",
            f"release = [{q(public[KeyRole.RELEASE])}]",
            f"director = [{q(public[KeyRole.DIRECTOR])}]",
            "",
            "[storage]",
            f"data_dir = {q(str(agent_data_dir))}",
            "",
            "[runtime]",
            "threads = 1",
            "",
        ]
    )
