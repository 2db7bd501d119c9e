"""What agents report, applied to the registry.

Events and telemetry carry ``(device_id, boot_id, seq)``; a row already seen
is skipped, so QoS 1 duplicates are harmless. A message from an unknown
or removed device is dropped with a warning.

A deployment moves only forward (pending → downloading → … → a final state)
and never leaves a final state, whatever arrives later: a replayed, late or
forged report can add a row to the event log, not reopen or flip settled
work. The two final states the server draws itself give way to the device's
own account if that arrives after all: superseded (the device moved on to a
newer directive without a word about this one) and cancelled (the rollout was
stopped before the device finished). A *rejection* (a desired state the agent
refused before trusting it) names a deployment only as the unverified message claimed it, so it is logged
and kept, never applied. The device's retained state carries the outcome of
its last deployment and the deployment its active model came from, which
settles an open deployment whose final event never arrived.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from server import measurements
from server.db import Session, queries
from server.db.models import Deployment, Device, EventRecord, LoadErrorRecord, TelemetryRecord
from server.latency.store import store_serving_report
from server.load_errors import known_load_errors
from server.rollouts.states import PROGRESS, SUPERSEDED, DeploymentState
from shared.codec import encode
from shared.messages import Availability, DeviceState, Event, Telemetry, UpdateState
from shared.trial import LOAD_ERROR

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _device(session: Session, device_id: str) -> Device | None:
    device = queries.live_device(session, device_id)
    if device is None:
        logger.warning("dropped a report from unknown or removed device %s", device_id)
    return device


def _deployment(session: Session, device: Device, deployment_id: str | None) -> Deployment | None:
    if deployment_id is None:
        return None
    deployment = session.get(Deployment, deployment_id)
    if deployment is None or deployment.device_id != device.id:
        logger.warning("device %s reported on unknown deployment %s", device.name, deployment_id)
        return None
    return deployment


def apply_availability(session: Session, device_id: str, message: Availability) -> None:
    device = _device(session, device_id)
    if device is not None:
        device.online = message.online
        device.last_seen = _now()


def _server_drawn(deployment: Deployment) -> bool:
    """A final state the server concluded without the device's word, which that word replaces."""
    state = DeploymentState(deployment.state)
    return state is DeploymentState.CANCELLED or (state is DeploymentState.FAILED and deployment.reason == SUPERSEDED)


def advance_deployment(session: Session, device: Device, deployment: Deployment, state: str, reason: str) -> bool:
    """Move ``deployment`` to ``state`` if that is forward and it is not settled; True if it moved."""
    current, target = DeploymentState(deployment.state), DeploymentState.of(UpdateState(state))
    if current.is_final:
        if not (target.is_final and _server_drawn(deployment) and reason != SUPERSEDED):
            return False
    elif not target.is_final and PROGRESS.index(target) <= PROGRESS.index(current):
        return False
    deployment.state = target.value
    deployment.reason = reason
    deployment.updated_at = _now()
    if target.is_final and reason.startswith(LOAD_ERROR) and device.runtime:  # the agent's trial could not load it
        _remember_incompatibility(session, device, deployment, reason)
    logger.info("%s: deployment %s %s %s", device.name, deployment.id, target.value, reason)
    return True


def _reported_outcomes(message: DeviceState) -> dict[str, tuple[str, str]]:
    """What a device's state says its deployments ended as: {deployment id: (final state, reason)}."""
    outcomes: dict[str, tuple[str, str]] = {}
    if message.active is not None:
        outcomes[message.active.deployment_id] = (UpdateState.COMMITTED.value, "")
    if message.outcome is not None:  # the last one's own account wins
        outcomes[message.outcome.deployment_id] = (message.outcome.state, message.outcome.reason)
    return outcomes


def reconcile_deployments(session: Session, device: Device, message: DeviceState) -> None:
    """Settle deployments from the device's own state, for when a final event was lost: how its last
    one ended, which one its active model came from, and the older ones it has moved past."""
    for deployment_id, reported in _reported_outcomes(message).items():
        deployment = session.get(Deployment, deployment_id)
        if deployment is None or deployment.device_id != device.id:
            continue  # not one of this server's deployments for this device
        if advance_deployment(session, device, deployment, *reported):
            logger.info("%s: deployment %s settled from the device's state", device.name, deployment_id)
    settle_superseded(session, device, message.directive_seq)


def settle_superseded(session: Session, device: Device, seq: int) -> None:
    """The device has taken the directive numbered ``seq``: its older deployments still open are over
    (it ends or cancels one install before it takes the next, so it never ran them or its word was lost)."""
    # Asked for every report: without a flush of the batch so far (one per report was most of the ingest's
    # time), so a deployment an earlier report of the batch just ended still reads as open; its state says.
    with session.no_autoflush:
        older = queries.open_deployments(session, device.id, below_seq=seq)
    for deployment in older:
        if not DeploymentState(deployment.state).is_final:
            advance_deployment(session, device, deployment, UpdateState.FAILED.value, SUPERSEDED)


def apply_state(session: Session, message: DeviceState) -> Device | None:
    device = _device(session, message.device_id)
    if device is None:
        return None
    device.last_seen = _now()
    if message.hello:
        device.last_hello_at = device.last_seen
    device.online = True
    device.boot_id = message.boot_id
    device.runtime = f"{message.runtime} {message.runtime_version}".strip()
    device.update_state = message.update_state
    device.reported_seq = message.directive_seq
    active = message.active
    device.active_deployment_id = active.deployment_id if active else None
    device.active_model = active.model if active else None
    device.active_version = active.version if active else None
    device.active_quantization = active.quantization if active else None
    reconcile_deployments(session, device, message)
    return device


def apply_event(session: Session, message: Event) -> bool:
    """Store and apply an event; True when it is stored (now or before), so the agent may forget it.
    (The server's loop stores a whole batch's events at once: ``server/report_batch.py``.)"""
    device = _device(session, message.device_id)
    if device is None:
        return False
    if queries.event_seen(session, device.id, message.boot_id, message.seq):
        return True
    session.add(EventRecord(**event_row(device.id, message)))
    apply_new_event(session, device, message)
    return True


def event_row(device_id: str, message: Event) -> dict[str, Any]:
    """The ``events`` row of ``message``."""
    return {"device_id": device_id, "boot_id": message.boot_id, "seq": message.seq,
            "deployment_id": message.deployment_id, "state": message.state, "reason": message.reason,
            "ts": message.ts, "received_at": _now()}


def apply_new_event(session: Session, device: Device, message: Event) -> None:
    """What an event just stored (not a redelivery) changes: its deployment, unless it is a rejection."""
    if message.is_rejection:
        logger.warning("%s rejected a desired state (it claimed deployment %s): %s", device.name,
                       message.deployment_id or "-", message.reason)
        return
    deployment = _deployment(session, device, message.deployment_id)
    if deployment is not None:
        advance_deployment(session, device, deployment, message.state, message.reason)
        settle_superseded(session, device, deployment.seq)


def _remember_incompatibility(session: Session, device: Device, deployment: Deployment, reason: str) -> None:
    """Keep the device's load_error report on the deployment's model file, once per deployment."""
    model_sha256 = deployment.release.model_sha256
    if model_sha256 is None or device.runtime is None:
        return
    if queries.load_error_recorded(session, model_sha256, device.runtime, deployment.id):
        return  # a redelivery, or the same outcome seen again through the device's state
    session.add(LoadErrorRecord(model_sha256=model_sha256, runtime=device.runtime, device_id=device.id,
                                deployment_id=deployment.id, reason=reason))
    known = known_load_errors(session, model_sha256, device.runtime)
    assert known is not None  # the report just added
    logger.warning("%s on %s cannot load %s (%d report(s) from %s): later rollouts of it to that runtime %s",
                   device.name, device.runtime, model_sha256[:12], len(known.reports), known.reporters(),
                   "are refused unless overridden" if known.confirmed else "warn until another report confirms it")


def apply_telemetry(session: Session, message: Telemetry) -> bool:
    """Store telemetry; True when it is stored (now or before), so the agent may forget it.

    Serving reports go to the latency store (``server/latency/store.py``); trial results to ``telemetry``
    (the server's loop stores a whole batch of those at once: ``server/report_batch.py``)."""
    device = _device(session, message.device_id)
    if device is None:
        return False
    if message.kind == "serving":
        return store_serving_report(session, device, message)
    if queries.telemetry_seen(session, device.id, message.boot_id, message.seq):
        return True
    session.add(TelemetryRecord(**telemetry_row(device.id, message)))
    apply_new_telemetry(session, device, message)
    return True


def telemetry_row(device_id: str, message: Telemetry) -> dict[str, Any]:
    """The ``telemetry`` row of a trial result (not a serving report)."""
    bench = message.benchmark
    return {"device_id": device_id, "boot_id": message.boot_id, "seq": message.seq,
            "deployment_id": message.deployment_id, "kind": message.kind, "ts": message.ts,
            "p50_ms": bench.p50_ms if bench else None, "p95_ms": bench.p95_ms if bench else None,
            "accuracy": message.accuracy, "body": encode(message), "received_at": _now()}


def apply_new_telemetry(session: Session, device: Device, message: Telemetry) -> None:
    """What a trial result just stored changes: its deployment's measured metrics (or, for a benchmark-only
    trial, its measurement's)."""
    if message.kind == "measurement":
        measurements.record(session, device, message)
        return
    bench = message.benchmark
    deployment = _deployment(session, device, message.deployment_id)
    if deployment is not None and bench is not None:
        deployment.p50_ms = bench.p50_ms
        deployment.p95_ms = bench.p95_ms
        deployment.accuracy = message.accuracy
        if message.previous is not None:  # the model it replaces, measured in the same trial
            deployment.previous_accuracy = message.previous.accuracy
            deployment.previous_p95_ms = message.previous.p95_ms
        deployment.updated_at = _now()
