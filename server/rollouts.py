"""Rollouts: start one, report its status, and the engine that drives it.

``start_rollout`` resolves the targets, builds (or reuses) each profile's
variant, signs a release per variant and records a pending deployment per
device. ``RolloutEngine.tick(now)`` is a deterministic step over database
state: it signs and publishes directives for new deployments and settles
rollouts whose devices all reported, so a restarted server simply resumes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from server.blobs import BlobStore
from server.catalog import resolve_version
from server.compression import build_profiles
from server.db import Database, Session, queries
from server.db.models import Deployment, Device, Release, Rollout
from server.devices import find_device, get_profile
from server.ingest import SUPERSEDED
from server.keys import SigningKeys
from server.load_errors import Shipment, vet_shipments
from server.releases import sign_release
from shared import PROTOCOL_VERSION
from shared.codec import decode, encode
from shared.errors import NotFoundError, UserInputError
from shared.messages import DesiredState, Directive, Gates, Manifest, SignedEnvelope, encode_payload
from shared.signing import sign_envelope
from shared.topics import TopicKind, device_topic

logger = logging.getLogger(__name__)

DIRECTIVE_LIFETIME_S = 7 * 24 * 3600
FINAL_STATES = frozenset(queries.FINAL_STATES)

Publish = Callable[[str, bytes, bool], None]  # topic, payload, retain


@dataclass(frozen=True)
class DeviceStatus:
    device: str
    profile: str
    state: str
    quantization: str
    size_bytes: int
    p50_ms: float | None
    p95_ms: float | None
    accuracy: float | None
    host_accuracy: float
    gate: float
    reason: str


@dataclass(frozen=True)
class RolloutStatus:
    rollout: str
    model: str
    version: int
    state: str
    devices: tuple[DeviceStatus, ...]

    @property
    def settled(self) -> bool:
        return all(d.state in FINAL_STATES for d in self.devices)


def settled_state(states: list[str]) -> str | None:
    """A rollout's final state once every device reported a final state, else None."""
    if not states or not all(s in FINAL_STATES for s in states):
        return None
    return "succeeded" if all(s == "committed" for s in states) else "failed"


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserInputError(f"{name} must be between 0 and 1, got {value}")


def _targets(session: Session, profiles: tuple[str, ...], device_names: tuple[str, ...]) -> dict[str, Device]:
    targets: dict[str, Device] = {}
    for profile in profiles:
        get_profile(session, profile)
        for device in queries.devices_with_profile(session, profile):
            targets[device.id] = device
    for name in device_names:
        device = find_device(session, name)
        targets[device.id] = device
    if not targets:
        raise NotFoundError(f"no registered device has profile {', '.join(profiles)}")
    return targets


def start_rollout(
    db: Database,
    blobs: BlobStore,
    keys: SigningKeys,
    model_ref: str,
    *,
    profiles: tuple[str, ...] = (),
    device_names: tuple[str, ...] = (),
    max_accuracy_drop: float = 0.02,
    min_accuracy: float = 0.0,
    progress: Callable[[str], None] = lambda _: None,
    ignore_load_errors: bool = False,
    warn: Callable[[str], None] = logger.warning,
) -> str:
    """Create a rollout of ``model_ref`` to the selected devices; returns its id.

    Each target profile ships the variant its compression report chose; a
    profile not built yet is built first (``model build``), without holding the
    database. A profile whose every variant failed, missed the accuracy budget
    or exceeded its limits is refused here, before anything is sent. So is a
    variant that devices confirmed their runtime cannot load (see
    ``server.load_errors``), unless ``ignore_load_errors``; an unconfirmed
    report, or an overridden one, is passed to ``warn``.
    """
    if not profiles and not device_names:
        raise UserInputError("select the target devices with --profile or --device")
    _check_fraction("--max-accuracy-drop", max_accuracy_drop)
    _check_fraction("--min-accuracy", min_accuracy)
    with db.session() as session:
        version = resolve_version(session, model_ref)
        ref = f"{version.model.name}:{version.version}"
        needed = sorted({d.profile_name for d in _targets(session, profiles, device_names).values()})
        unbuilt = [p for p in needed if queries.artifact_for_ids(session, version.id, p) is None]
    for report in build_profiles(db, blobs, ref, unbuilt, progress=progress) if unbuilt else []:
        if report.chosen is None:
            reasons = "; ".join(f"{v.recipe}: {v.verdict} ({v.reason})" for v in report.variants)
            raise UserInputError(f"no variant of {ref} fits profile {report.profile}: {reasons}")
    with db.session() as session:
        version = resolve_version(session, ref)
        targets = _targets(session, profiles, device_names)
        gate = max(min_accuracy, version.reference_accuracy - max_accuracy_drop)
        rollout = Rollout(
            id=f"r-{secrets.token_hex(4)}",
            model_version_id=version.id,
            max_accuracy_drop=max_accuracy_drop,
            min_accuracy=min_accuracy,
        )
        session.add(rollout)
        releases: dict[str, Release] = {}
        shipments: dict[tuple[str, str], list[str]] = {}  # (profile, runtime): target device names
        for device in sorted(targets.values(), key=lambda d: d.name):
            if device.profile_name not in releases:
                artifact = queries.artifact_for_ids(session, version.id, device.profile_name)
                if artifact is None:
                    raise UserInputError(f"no variant of {ref} fits profile {device.profile_name}")
                limit = device.profile.max_model_bytes
                if limit is not None and artifact.size_bytes > limit:  # the profile changed since the build
                    raise UserInputError(
                        f"{ref}'s {artifact.recipe or artifact.quantization} variant ({artifact.size_bytes} bytes) "
                        f"exceeds profile {device.profile_name}'s limit of {limit} bytes: rebuild it with "
                        f"'edgefleet model build {ref} --profile {device.profile_name}'"
                    )
                releases[device.profile_name] = sign_release(session, blobs, keys, artifact)
            if device.runtime:
                shipments.setdefault((device.profile_name, device.runtime), []).append(device.name)
            device.directive_seq += 1
            session.add(
                Deployment(
                    id=f"dep-{secrets.token_hex(6)}",
                    rollout_id=rollout.id,
                    device_id=device.id,
                    release_id=releases[device.profile_name].id,
                    seq=device.directive_seq,
                    min_accuracy_gate=round(gate, 6),
                )
            )
        planned = [_shipment(ref, releases[profile], runtime, names) for (profile, runtime), names in shipments.items()]
        warnings = vet_shipments(session, planned, ignore_load_errors=ignore_load_errors)  # a refusal rolls back
        session.flush()
        rollout_id = rollout.id
    for warning in warnings:  # once the rollout exists
        warn(warning)
    return rollout_id


def _shipment(model_ref: str, release: Release, runtime: str, device_names: list[str]) -> Shipment:
    artifact = release.artifact
    return Shipment(model_ref, artifact.profile_name, artifact.recipe or artifact.quantization, artifact.sha256,
                    runtime, tuple(device_names))


def rollout_status(db: Database, rollout_id: str) -> RolloutStatus:
    with db.session() as session:
        rollout = queries.rollout(session, rollout_id)
        if rollout is None:
            raise NotFoundError(f"unknown rollout {rollout_id!r}")
        rows = []
        for dep in rollout.deployments:
            manifest = decode(Manifest, dep.release.manifest["signed"])  # what was shipped, as signed
            rows.append(
                DeviceStatus(
                    device=dep.device.name,
                    profile=dep.device.profile_name,
                    state=dep.state,
                    quantization=manifest.quantization,
                    size_bytes=manifest.file("model").size,
                    p50_ms=dep.p50_ms,
                    p95_ms=dep.p95_ms,
                    accuracy=dep.accuracy,
                    host_accuracy=manifest.reference.host_accuracy,
                    gate=dep.min_accuracy_gate,
                    reason=dep.reason,
                )
            )
        version = rollout.model_version
        state = settled_state([d.state for d in rows]) or rollout.state
        return RolloutStatus(rollout.id, version.model.name, version.version, state, tuple(rows))


def desired_payload(session: Session, deployment: Deployment) -> bytes:
    assert deployment.directive is not None
    release = deployment.release
    desired = DesiredState(
        v=PROTOCOL_VERSION,
        directive=decode(SignedEnvelope, deployment.directive),
        manifest=decode(SignedEnvelope, release.manifest),
    )
    return encode_payload(desired)


class RolloutEngine:
    def __init__(self, db: Database, keys: SigningKeys, publish: Publish) -> None:
        self.db = db
        self.keys = keys
        self.publish = publish

    def sign_directive(self, deployment: Deployment, now: float) -> None:
        directive = Directive(
            v=PROTOCOL_VERSION,
            device_id=deployment.device_id,
            deployment_id=deployment.id,
            rollout_id=deployment.rollout_id,
            manifest_sha256=deployment.release.manifest_sha256,
            seq=deployment.seq,
            gates=Gates(min_accuracy=deployment.min_accuracy_gate),
            issued=int(now),
            expires=int(now) + DIRECTIVE_LIFETIME_S,
        )
        deployment.directive = encode(sign_envelope(directive, self.keys.director))

    def send(self, session: Session, deployment: Deployment, now: float) -> None:
        """Sign (or re-sign an expiring) directive and publish the retained desired state."""
        directive = deployment.directive
        if directive is None or directive["signed"]["expires"] - now < DIRECTIVE_LIFETIME_S / 2:
            self.sign_directive(deployment, now)
        self.publish(device_topic(TopicKind.DESIRED, deployment.device_id), desired_payload(session, deployment), True)
        deployment.published_at = datetime.fromtimestamp(now, timezone.utc)

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.session() as session:
            # One that was sent is settled by what the device reports (ingest): it may still be installing it.
            for deployment in queries.superseded_unsent_deployments(session):
                deployment.state, deployment.reason = "failed", SUPERSEDED
                deployment.published_at = datetime.fromtimestamp(now, timezone.utc)
            session.flush()
            for deployment in queries.unpublished_deployments(session):
                logger.info("publishing deployment %s to %s", deployment.id, deployment.device.name)
                self.send(session, deployment, now)
            for rollout in queries.running_rollouts(session):
                final = settled_state([d.state for d in rollout.deployments])
                if final is not None:
                    rollout.state = final
                    rollout.finished_at = datetime.fromtimestamp(now, timezone.utc)
                    logger.info("rollout %s %s", rollout.id, rollout.state)
