"""The one read model of rollouts: what ``rollout status/list``, ``events`` and the HTTP API show.

``status_json`` keeps the keys ``rollout status --json`` always had (rollout,
model, version, state, devices[] with device, profile, state, quantization,
size_bytes, p50_ms, p95_ms, accuracy, reason) and adds waves[] with their
gates, and per device its wave, recipe and the replaced model's numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from server.db import Database, Session, queries
from server.db.models import AuditEvent, Deployment, Rollout
from server.devices import find_device
from server.rollouts.policy import RolloutPolicy
from server.rollouts.states import DeploymentKind, DeploymentState, RolloutState, superseded
from server.selection import Selection
from shared.errors import NotFoundError
from shared.messages import Manifest
from shared.protocol import decode_versioned

WAITING = "waiting"  # a selected device whose wave has not started


@dataclass(frozen=True)
class GateStatus:
    name: str
    measured: float | None
    threshold: float | None
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class WaveStatus:
    index: int
    spec: str
    target_count: int | None
    state: str
    gates: tuple[GateStatus, ...]


@dataclass(frozen=True)
class DeviceStatus:
    device: str
    profile: str
    wave: int | None
    state: str
    recipe: str
    quantization: str
    size_bytes: int | None
    p50_ms: float | None
    p95_ms: float | None
    accuracy: float | None
    previous_accuracy: float | None
    previous_p95_ms: float | None
    host_accuracy: float | None
    gate: float | None
    reason: str
    timed_out: bool = False
    reverted: str | None = None  # the state of the revert a fleet rollback sent it, if any


@dataclass(frozen=True)
class RolloutStatus:
    rollout: str
    model: str
    version: int
    state: str
    state_reason: str
    selection: str
    policy: RolloutPolicy
    waves: tuple[WaveStatus, ...]
    devices: tuple[DeviceStatus, ...]

    @property
    def settled(self) -> bool:
        """Nothing more will happen by itself: the rollout stopped moving and every device sent finished."""
        deployed = [d for d in self.devices if d.state != WAITING]
        return self.state not in (RolloutState.RUNNING.value, RolloutState.PAUSED.value) and all(
            DeploymentState(d.state).is_final or d.timed_out for d in deployed)


@dataclass(frozen=True)
class RolloutSummary:
    rollout: str
    model: str
    version: int
    state: str
    selection: str
    waves: str  # e.g. "2/3 passed"
    devices: int
    committed: int
    failed: int
    created_at: datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    ts: datetime
    kind: str
    actor: str
    rollout: str | None
    device: str | None
    message: str
    data: dict[str, Any]


def _manifest(deployment: Deployment) -> Manifest:
    return decode_versioned(Manifest, deployment.release.manifest["signed"])  # what was shipped, as signed


def _device_status(deployment: Deployment, reverts: dict[str, Deployment]) -> DeviceStatus:
    manifest = _manifest(deployment)
    revert = reverts.get(deployment.id)
    return DeviceStatus(
        device=deployment.device.name, profile=deployment.device.profile_name, wave=deployment.wave,
        state=deployment.state, recipe=deployment.release.artifact.recipe or manifest.quantization,
        quantization=manifest.quantization, size_bytes=manifest.file("model").size, p50_ms=deployment.p50_ms,
        p95_ms=deployment.p95_ms, accuracy=deployment.accuracy, previous_accuracy=deployment.previous_accuracy,
        previous_p95_ms=deployment.previous_p95_ms, host_accuracy=manifest.reference.host_accuracy,
        gate=deployment.min_accuracy_gate, reason=deployment.reason, timed_out=deployment.timed_out_at is not None,
        reverted=revert.state if revert is not None else None,
    )


def _devices(session: Session, rollout: Rollout) -> tuple[DeviceStatus, ...]:
    installs: dict[str, Deployment] = {}
    reverts: dict[str, Deployment] = {}
    for deployment in rollout.deployments:
        if deployment.kind == DeploymentKind.REVERT.value:
            if deployment.reverts_id is not None:
                reverts[deployment.reverts_id] = deployment
        elif deployment.device_id not in installs or deployment.seq > installs[deployment.device_id].seq:
            installs[deployment.device_id] = deployment
    rows = [_device_status(d, reverts) for d in installs.values()]
    if rollout.state in (RolloutState.RUNNING.value, RolloutState.PAUSED.value):
        selection = Selection.from_json(rollout.selection)
        releases = {r.profile_name: r.release for r in rollout.releases}
        for device in queries.devices(session):
            if device.id in installs or not selection.matches(device):
                continue
            release = releases.get(device.profile_name)
            manifest = decode_versioned(Manifest, release.manifest["signed"]) if release is not None else None
            rows.append(DeviceStatus(
                device=device.name, profile=device.profile_name, wave=None, state=WAITING,
                recipe=(release.artifact.recipe or manifest.quantization) if release and manifest else "-",
                quantization=manifest.quantization if manifest else "-",
                size_bytes=manifest.file("model").size if manifest else None, p50_ms=None, p95_ms=None,
                accuracy=None, previous_accuracy=None, previous_p95_ms=None,
                host_accuracy=manifest.reference.host_accuracy if manifest else None, gate=None, reason="",
            ))
    rows.sort(key=lambda d: (d.wave is None, d.wave or 0, d.device))
    return tuple(rows)


def _rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = queries.rollout(session, rollout_id)
    if rollout is None:
        raise NotFoundError(f"unknown rollout {rollout_id!r}; 'edgefleet rollout list' shows them")
    return rollout


def rollout_status(db: Database, rollout_id: str) -> RolloutStatus:
    with db.reading() as session:
        rollout = _rollout(session, rollout_id)
        version = rollout.model_version
        waves = tuple(
            WaveStatus(w.index, w.spec, w.target_count, w.state, tuple(GateStatus(**g) for g in w.gates))
            for w in rollout.waves
        )
        return RolloutStatus(
            rollout=rollout.id, model=version.model.name, version=version.version, state=rollout.state,
            state_reason=rollout.state_reason, selection=Selection.from_json(rollout.selection).describe(),
            policy=RolloutPolicy.from_json(rollout.policy), waves=waves, devices=_devices(session, rollout),
        )


def list_rollouts(db: Database, limit: int = 50) -> list[RolloutSummary]:
    with db.reading() as session:
        rows = []
        for rollout in queries.recent_rollouts(session, limit):
            installs = [d for d in rollout.deployments if d.kind == DeploymentKind.INSTALL.value]
            passed = sum(1 for w in rollout.waves if w.state in ("passed", "overridden"))
            rows.append(RolloutSummary(
                rollout=rollout.id, model=rollout.model_version.model.name, version=rollout.model_version.version,
                state=rollout.state, selection=Selection.from_json(rollout.selection).describe(),
                waves=f"{passed}/{len(rollout.waves)} passed", devices=len({d.device_id for d in installs}),
                committed=sum(d.state == "committed" for d in installs),
                failed=sum(DeploymentState(d.state).is_failure and not superseded(d.reason) for d in installs),
                created_at=rollout.created_at,
            ))
        return rows


def _entry(event: AuditEvent, names: dict[str, str]) -> AuditEntry:
    return AuditEntry(event.id, event.ts, event.kind, event.actor, event.rollout_id,
                      names.get(event.device_id, event.device_id) if event.device_id else None, event.message,
                      event.data)


def list_events(db: Database, *, rollout_id: str | None = None, device_name: str | None = None,
                limit: int | None = None, since: float | None = None) -> list[AuditEntry]:
    """The audit log, oldest first: the newest ``limit`` entries, of those at or after ``since`` (epoch s)."""
    with db.reading() as session:
        device_id = find_device(session, device_name).id if device_name is not None else None
        if rollout_id is not None:
            _rollout(session, rollout_id)
        after = datetime.fromtimestamp(since, timezone.utc) if since is not None else None
        events = queries.audit_events(session, rollout_id=rollout_id, device_id=device_id, limit=limit, since=after)
        names = queries.device_names(session, {e.device_id for e in events if e.device_id})
        return [_entry(e, names) for e in events]


def status_json(status: RolloutStatus) -> dict[str, Any]:
    return {
        "rollout": status.rollout,
        "model": status.model,
        "version": status.version,
        "state": status.state,
        "state_reason": status.state_reason,
        "selection": status.selection,
        "policy": status.policy.to_json(),
        "waves": [
            {"index": w.index, "spec": w.spec, "target_count": w.target_count, "state": w.state,
             "gates": [asdict(g) for g in w.gates]}
            for w in status.waves
        ],
        "devices": [asdict(d) for d in status.devices],
    }


def summary_json(summary: RolloutSummary) -> dict[str, Any]:
    return {**asdict(summary), "created_at": summary.created_at.isoformat()}


def entry_json(entry: AuditEntry) -> dict[str, Any]:
    return {**asdict(entry), "ts": entry.ts.isoformat()}
