"""The read model of one device: what ``/api/v1/devices`` and ``/api/v1/devices/{name}`` show.

A device row is what ``device list --json`` prints (``DeviceRow`` as a dict); the detail adds the
device's recent deployments, newest first, with the numbers its trials reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from server.db import Database, Session
from server.db.models import Deployment
from server.devices import DeviceRow, active_recipes, find_device

RECENT_DEPLOYMENTS = 10


@dataclass(frozen=True)
class DeploymentEntry:
    id: str
    rollout: str
    kind: str  # "install" or "revert"
    model: str
    version: int
    wave: int | None
    state: str
    reason: str
    p50_ms: float | None
    p95_ms: float | None
    accuracy: float | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class DeviceDetail:
    device: DeviceRow
    deployments: tuple[DeploymentEntry, ...]  # newest first


def _recent_deployments(session: Session, device_id: str, limit: int) -> list[Deployment]:
    return list(session.scalars(
        select(Deployment).where(Deployment.device_id == device_id)
        .order_by(Deployment.created_at.desc(), Deployment.seq.desc()).limit(limit)
    ))


def device_detail(db: Database, name: str, *, limit: int = RECENT_DEPLOYMENTS) -> DeviceDetail:
    """Device ``name`` (NotFoundError if unknown or removed) and its newest ``limit`` deployments."""
    with db.reading() as session:
        device = find_device(session, name)
        row = DeviceRow.of(device, active_recipes(session, [device]).get(device.id))
        entries = tuple(
            DeploymentEntry(
                id=d.id, rollout=d.rollout_id, kind=d.kind, model=d.release.artifact.model_version.model.name,
                version=d.release.artifact.model_version.version, wave=d.wave, state=d.state, reason=d.reason,
                p50_ms=d.p50_ms, p95_ms=d.p95_ms, accuracy=d.accuracy, created_at=d.created_at,
                updated_at=d.updated_at,
            )
            for d in _recent_deployments(session, device.id, limit)
        )
        return DeviceDetail(row, entries)


def device_json(row: DeviceRow) -> dict[str, Any]:
    return asdict(row)


def deployment_json(entry: DeploymentEntry) -> dict[str, Any]:
    return {**asdict(entry), "created_at": entry.created_at.isoformat(), "updated_at": entry.updated_at.isoformat()}
