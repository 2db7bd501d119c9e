"""Starting a rollout: resolve the selection, build (or reuse) each profile's variant, sign releases.

This runs in the operator's command, never in the server process: building a
variant may import TensorFlow. The running server's engine then drives the
rollout from what this records: the selection (re-resolved while it is live),
the policy, one signed release per profile, and its waves, all waiting. No
deployment exists until its wave starts.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from server import audit
from server.blobs import BlobStore
from server.catalog import resolve_version
from server.compress.progress import ProgressCallback, ignore
from server.db import Database, Session, queries
from server.db.models import Device, Release, Rollout, RolloutRelease, Wave
from server.devices import find_device, get_profile
from server.keys import SigningKeys
from server.load_errors import Shipment, vet_shipments
from server.releases import offline_steps, sign_release, signed_release_for
from server.rollouts.policy import RolloutPolicy
from server.rollouts.states import RolloutState, WaveState
from server.selection import Selection, select_devices
from shared.errors import NotFoundError, UserInputError

logger = logging.getLogger(__name__)


def selected_devices(session: Session, selection: Selection) -> list[Device]:
    """The devices the selection names now; an unknown profile or device name is an error."""
    for profile in selection.profiles:
        get_profile(session, profile)
    for name in selection.devices:
        find_device(session, name)
    devices = select_devices(session, selection)
    if not devices:
        raise NotFoundError(f"no registered device matches the selection ({selection.describe()})")
    return devices


def start_rollout(
    db: Database,
    blobs: BlobStore,
    keys: SigningKeys,
    model_ref: str,
    selection: Selection,
    policy: RolloutPolicy | None = None,
    *,
    progress: ProgressCallback = ignore,
    ignore_load_errors: bool = False,
    warn: Callable[[str], None] = logger.warning,
    actor: str = audit.SERVER,
) -> str:
    """Create a rollout of ``model_ref`` to the selected devices; returns its id.

    Each selected profile ships the variant its compression report chose; a
    profile not built yet is built first (``model build``), without holding the
    database. A profile whose every variant failed, missed the accuracy budget
    or exceeded its limits is refused here, before anything is sent. So is a
    variant that devices confirmed their runtime cannot load (see
    ``server.load_errors``), unless ``ignore_load_errors``; an unconfirmed
    report, or an overridden one, is passed to ``warn``.
    """
    if selection.is_empty:
        raise UserInputError("select the target devices with --profile, --tag or --device")
    policy = policy or RolloutPolicy()
    with db.session() as session:
        version = resolve_version(session, model_ref)
        ref = f"{version.model.name}:{version.version}"
        needed = sorted({d.profile_name for d in selected_devices(session, selection)})
        unbuilt = [p for p in needed if queries.artifact_for_ids(session, version.id, p) is None]
    if unbuilt and keys.release is None:  # nothing built, so nothing signed offline either
        raise UserInputError(
            f"no variant of {ref} is built for profile(s) {', '.join(unbuilt)}, and this server holds no release key "
            f"(it is offline): run 'edgefleet model build {ref} --profile {unbuilt[0]}', then "
            f"{offline_steps(ref, unbuilt[0])}"
        )
    if unbuilt:
        from server.compression import build_profiles  # TensorFlow: only when something must be built

        for report in build_profiles(db, blobs, ref, unbuilt, progress=progress):
            if report.chosen is None:
                reasons = "; ".join(f"{v.recipe}: {v.verdict} ({v.reason})" for v in report.variants)
                raise UserInputError(f"no variant of {ref} fits profile {report.profile}: {reasons}")
    with db.session() as session:
        version = resolve_version(session, ref)
        devices = selected_devices(session, selection)
        rollout = Rollout(
            id=f"r-{secrets.token_hex(4)}", model_version_id=version.id, state=RolloutState.RUNNING.value,
            max_accuracy_drop=policy.max_accuracy_drop, min_accuracy=policy.min_accuracy,
            selection=selection.to_json(), policy=policy.to_json(), actor=actor,
        )
        session.add(rollout)
        releases: dict[str, Release] = {}
        for profile in sorted({d.profile_name for d in devices}):
            releases[profile] = release_for_profile(session, blobs, keys, rollout, profile, ref)
        for index, spec in enumerate(policy.waves):
            session.add(Wave(rollout_id=rollout.id, index=index, spec=spec, state=WaveState.WAITING.value, gates=[]))
        shipments: dict[tuple[str, str], list[str]] = {}  # (profile, runtime): device names
        for device in devices:
            if device.runtime:
                shipments.setdefault((device.profile_name, device.runtime), []).append(device.name)
        planned = [_shipment(ref, releases[profile], runtime, names) for (profile, runtime), names in shipments.items()]
        warnings = vet_shipments(session, planned, ignore_load_errors=ignore_load_errors)  # a refusal rolls back
        audit.record(
            session, "rollout.started",
            f"{ref} to {len(devices)} device(s) selected by {selection.describe()}, waves {','.join(policy.waves)}, "
            f"on failure {policy.on_failure.value}",
            actor=actor, rollout_id=rollout.id, data={"selection": selection.to_json(), "policy": policy.to_json()},
        )
        session.flush()
        rollout_id = rollout.id
    for warning in warnings:  # once the rollout exists
        warn(warning)
    return rollout_id


def release_for_profile(
    session: Session, blobs: BlobStore, keys: SigningKeys, rollout: Rollout, profile: str, ref: str
) -> Release:
    """Sign the release of the variant ``profile`` ships (with the release key offline: take the newest one
    imported) and record it as this rollout's for the profile."""
    artifact = queries.artifact_for_ids(session, rollout.model_version_id, profile)
    if artifact is None:
        raise UserInputError(f"no variant of {ref} is built for profile {profile}: "
                             f"run 'edgefleet model build {ref} --profile {profile}'")
    limit = get_profile(session, profile).max_model_bytes
    if limit is not None and artifact.size_bytes > limit:  # the profile changed since the build
        raise UserInputError(
            f"{ref}'s {artifact.recipe or artifact.quantization} variant ({artifact.size_bytes} bytes) exceeds "
            f"profile {profile}'s limit of {limit} bytes: rebuild it with "
            f"'edgefleet model build {ref} --profile {profile}'"
        )
    if keys.release is None:  # offline: the newest release signed elsewhere and imported
        release = signed_release_for(session, artifact, keys.root, ref)
    else:
        release = sign_release(session, blobs, keys, artifact)
    session.add(RolloutRelease(rollout_id=rollout.id, profile_name=profile, release_id=release.id))
    return release


def _shipment(model_ref: str, release: Release, runtime: str, device_names: list[str]) -> Shipment:
    artifact = release.artifact
    return Shipment(model_ref, artifact.profile_name, artifact.recipe or artifact.quantization, artifact.sha256,
                    runtime, tuple(device_names))
