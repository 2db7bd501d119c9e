"""Devices: register, tag, remove and list them.

Every change is written to the audit log with who made it, in the same
transaction. A removed device keeps its row, so the history of its
deployments still names it, but it is gone from every lookup and listing,
its name is free for a new device, and its reports are dropped (``server.ingest``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from server import audit
from server.db import Database, Session, queries
from server.db.models import Device, Profile
from server.roots import ROOT_FILE
from server.selection import MAX_TAGS, Selection, check_tag_key, select_devices, tag_pairs
from shared.agent_toml import AgentToml, BrokerIdentity
from shared.errors import AlreadyExistsError, NotFoundError, UserInputError
from shared.serve_address import DEFAULT_SERVE_LISTEN

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REMOVED = "removed"  # the final state of a deployment whose device was removed while it was open
REMOVED_REASON = "device removed"


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
    tags: dict[str, str] = field(default_factory=dict)
    active_recipe: str | None = None  # the recipe that built the active model, e.g. prune:0.5+int8

    @classmethod
    def of(cls, device: Device, active_recipe: str | None = None) -> DeviceRow:
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
            tags=dict(sorted((device.tags or {}).items())),
            active_recipe=active_recipe,
        )

    @property
    def variant(self) -> str | None:
        """What the active model is, as precisely as known: its recipe, else the quantization it reported."""
        return self.active_recipe or self.active_quantization


@dataclass(frozen=True)
class TagChange:
    device: DeviceRow
    not_set: tuple[str, ...]  # keys asked to be removed that the device did not have


@dataclass(frozen=True)
class RemovedDevice:
    device: DeviceRow
    settled: tuple[str, ...]  # ids of the open deployments settled as removed


def get_profile(session: Session, name: str) -> Profile:
    profile = session.get(Profile, name)
    if profile is None:
        known = ", ".join(queries.profile_names(session))
        raise NotFoundError(f"unknown profile {name!r}; known profiles: {known}")
    return profile


def _tags_text(tags: dict[str, str] | Sequence[tuple[str, str]]) -> str:
    pairs = tags.items() if isinstance(tags, dict) else tags
    return " ".join(f"{k}={v}" for k, v in pairs) or "none"


def _check_tag_count(name: str, tags: dict[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        raise UserInputError(f"device {name!r} would have {len(tags)} tags; at most {MAX_TAGS} are allowed")


def register_device(
    db: Database, name: str, profile: str, tags: Sequence[tuple[str, str]] = (), *, actor: str | None = None,
    broker_secret: str | None = None,
) -> DeviceRow:
    """``broker_secret``: the hash of the device's broker password (``server/broker_identities.py``)."""
    _check_name(name)
    initial = dict(tag_pairs(tags))
    _check_tag_count(name, initial)
    with db.session() as session:
        get_profile(session, profile)
        if queries.device_by_name(session, name) is not None:
            raise AlreadyExistsError(f"a device named {name!r} is already registered")
        device = _add_device(session, name, profile, initial, actor or audit.operator(), broker_secret)
        session.flush()
        return DeviceRow.of(device)


def register_devices(
    db: Database, names: Sequence[str], profile: str, broker_secrets: Sequence[str | None], *,
    actor: str | None = None, resume: Collection[str] = (),
) -> list[DeviceRow]:
    """Register many devices in one transaction (``edgefleet device register-fleet``): all of them, or none
    when a name is invalid or already taken. ``broker_secrets``: each device's password hash, in order.
    ``resume``: names an earlier run registered but died before writing their configs; one of them already
    registered with ``profile`` gets the new password hash (the old password was never written down)."""
    if len(set(names)) != len(names):
        raise UserInputError("the device names to register must be distinct")
    if len(broker_secrets) != len(names):
        raise ValueError("one broker secret per device name")
    for name in names:
        _check_name(name)
    actor = actor or audit.operator()
    with db.session() as session:
        get_profile(session, profile)
        wanted = set(names)
        registered = {d.name: d for d in queries.devices(session) if d.name in wanted}
        resumed = {n: d for n, d in registered.items() if n in resume and d.profile_name == profile}
        if taken := sorted(set(registered) - set(resumed)):
            shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
            raise AlreadyExistsError(f"{len(taken)} of these names are already registered ({shown}); nothing was "
                                     "registered")
        devices = []
        for name, secret in zip(names, broker_secrets):
            device = resumed.get(name)
            if device is None:
                device = _add_device(session, name, profile, {}, actor, secret)
            else:
                device.broker_secret = secret
                audit.record(session, "device.resumed", f"register-fleet wrote the config of {name} ({device.id}) "
                             "that an interrupted run did not: a new broker password", actor=actor,
                             device_id=device.id, data={"name": name})
            devices.append(device)
        session.flush()
        return [DeviceRow.of(device) for device in devices]


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UserInputError(
            f"invalid device name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def _add_device(session: Session, name: str, profile: str, tags: dict[str, str], actor: str,
                broker_secret: str | None) -> Device:
    device = Device(id=f"d-{secrets.token_hex(5)}", name=name, profile_name=profile, tags=tags,
                    broker_secret=broker_secret)
    session.add(device)
    audit.record(session, "device.registered", f"registered device {name} ({device.id}), profile {profile}, "
                 f"tags {_tags_text(tags)}", actor=actor, device_id=device.id,
                 data={"name": name, "profile": profile, "tags": tags})
    return device


def tag_device(
    db: Database, name: str, tags: Sequence[tuple[str, str]] = (), remove: Collection[str] = (),
    *, actor: str | None = None,
) -> TagChange:
    """Set (or overwrite) ``tags`` on device ``name`` and remove the keys in ``remove``."""
    new = dict(tag_pairs(tags))
    dropped = tuple(sorted({check_tag_key(key) for key in remove}))
    if not new and not dropped:
        raise UserInputError("nothing to change: give tags as KEY=VALUE, or --remove KEY")
    if both := sorted(set(new) & set(dropped)):
        raise UserInputError(f"tag {', '.join(map(repr, both))} is both set and removed; choose one")
    with db.session() as session:
        device = find_device(session, name)
        before: dict[str, str] = dict(device.tags or {})
        after = {k: v for k, v in before.items() if k not in dropped} | new
        _check_tag_count(name, after)
        device.tags = dict(sorted(after.items()))  # a new dict: the JSON column sees the change
        not_set = tuple(key for key in dropped if key not in before)
        audit.record(session, "device.tagged",
                     f"tags of {name}: set {_tags_text(sorted(new.items()))}; removed "
                     f"{', '.join(k for k in dropped if k in before) or 'none'}; now {_tags_text(device.tags)}",
                     actor=actor or audit.operator(), device_id=device.id,
                     data={"set": new, "removed": [k for k in dropped if k in before], "before": before,
                           "after": device.tags})
        session.flush()
        return TagChange(DeviceRow.of(device), not_set)


def remove_device(db: Database, name: str, *, actor: str | None = None) -> RemovedDevice:
    """Remove device ``name``: it leaves every listing and lookup, its name is free again, and each of
    its deployments still open ends as ``removed`` (final), so no rollout waits for it."""
    actor = actor or audit.operator()
    now = datetime.now(timezone.utc)
    with db.session() as session:
        device = find_device(session, name)
        settled = []
        for deployment in queries.open_deployments(session, device.id):
            previous = deployment.state
            deployment.state, deployment.reason, deployment.updated_at = REMOVED, REMOVED_REASON, now
            settled.append(deployment.id)
            audit.record(session, "deployment.removed",
                         f"deployment {deployment.id} of {name} ended as {REMOVED} (was {previous}): {REMOVED_REASON}",
                         actor=actor, rollout_id=deployment.rollout_id, device_id=device.id,
                         data={"deployment": deployment.id, "previous_state": previous})
        device.removed_at = now
        device.broker_secret = None  # its broker identity goes with it (server/broker_identities.py)
        audit.record(session, "device.removed",
                     f"removed device {name} ({device.id}), profile {device.profile_name}; "
                     f"{len(settled)} open deployment(s) settled as {REMOVED}",
                     actor=actor, device_id=device.id,
                     data={"name": name, "profile": device.profile_name, "tags": dict(device.tags or {}),
                           "settled_deployments": settled})
        session.flush()
        return RemovedDevice(DeviceRow.of(device), tuple(settled))


def list_devices(db: Database, selection: Selection | None = None) -> list[DeviceRow]:
    """Live devices by name: all of them, or those ``selection`` matches (its profiles must exist)."""
    with db.reading() as session:
        if selection is None:
            devices = list(queries.devices(session))
        else:
            for profile in selection.profiles:
                get_profile(session, profile)
            devices = select_devices(session, selection)
        recipes = active_recipes(session, devices)
        return [DeviceRow.of(d, recipes.get(d.id)) for d in devices]


def active_recipes(session: Session, devices: Sequence[Device]) -> dict[str, str]:
    """Device id -> the recipe that built its active model: the recipe of the artifact its active deployment
    shipped, or, if that profile has been rebuilt since, the report row with the shipped file's digest."""
    active = {d.active_deployment_id: d for d in devices if d.active_deployment_id}
    recipes: dict[str, str] = {}
    for deployment_id, (device_id, release) in queries.shipped_releases(session, list(active)).items():
        device, artifact = active[deployment_id], release.artifact
        if device_id != device.id:  # not this device's deployment: its report is wrong, show what it says
            continue
        if artifact.sha256 == release.model_sha256:
            recipe: str | None = artifact.recipe
        elif release.model_sha256 is not None:
            recipe = queries.recipe_of_file(session, artifact.model_version_id, artifact.profile_name,
                                            release.model_sha256)
        else:
            recipe = None
        if recipe:
            recipes[device.id] = recipe
    return recipes


def find_device(session: Session, name: str) -> Device:
    device = queries.device_by_name(session, name)
    if device is None:
        raise NotFoundError(f"unknown device {name!r}; 'edgefleet device list' shows the registered ones")
    return device




def agent_config_toml(
    device: DeviceRow, broker: str | BrokerIdentity, agent_data_dir: Path, *, root_file: str = ROOT_FILE,
    serve_listen: str = DEFAULT_SERVE_LISTEN, report_interval_s: float = 10.0,
) -> str:
    """The agent.toml that ``edgefleet agent --config`` reads; it trusts the root of trust in ``root_file``
    (relative to the config's directory; ``server.roots.write_root_file`` writes it) and follows its rotations.
    ``broker``: a URL, or the device's broker identity; ``serve_listen``: where the agent's local inference
    endpoint listens (HOST:PORT, port 0 for any free port, or unix:/path); ``report_interval_s``: how often it
    reports the latency of its calls."""
    return AgentToml(
        device_id=device.id, name=device.name, profile=device.profile,
        broker=broker if isinstance(broker, BrokerIdentity) else BrokerIdentity(broker),
        data_dir=str(agent_data_dir), root_file=root_file, serve_listen=serve_listen,
        report_interval_s=report_interval_s,
    ).render()
