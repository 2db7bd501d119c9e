"""The registry's queries, so that services outside ``server/db`` never build SQL."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, selectinload, undefer
from sqlalchemy.orm.attributes import set_committed_value

from server.db.models import (
    Artifact,
    AuditEvent,
    Deployment,
    Device,
    EnrolmentToken,
    EventRecord,
    LoadErrorRecord,
    Measurement,
    Model,
    ModelVersion,
    Profile,
    Release,
    Rollout,
    TelemetryRecord,
    Variant,
)

# A deployment in one of these never changes again (but for the device's own word replacing a conclusion the
# server drew: see server/ingest.py). ``removed``: its device was removed while it was open; ``cancelled``: the
# rollout was stopped before the device finished it.
FINAL_STATES = ("committed", "rolled_back", "failed", "removed", "cancelled")

# Every device lookup goes through this: a removed device keeps its row for its deployments' history
# (``Deployment.device`` still loads it) but is otherwise gone, and its name may belong to a new device.
_LIVE = Device.removed_at.is_(None)


def device_names(session: Session, ids: Collection[str]) -> dict[str, str]:
    """{device id: name}, removed devices included (the history names them)."""
    if not ids:
        return {}
    rows = session.execute(select(Device.id, Device.name).where(Device.id.in_(ids))).all()
    return {device_id: name for device_id, name in rows}


def profile_names(session: Session) -> list[str]:
    return list(session.scalars(select(Profile.name).order_by(Profile.name)))


def live_device(session: Session, device_id: str) -> Device | None:
    """The device with this id, unless it is unknown or removed."""
    device = session.get(Device, device_id)
    return device if device is not None and device.removed_at is None else None


def live_devices(session: Session, ids: Collection[str]) -> dict[str, Device]:
    """The live devices among ``ids``, in one query (later ``session.get`` calls find them in the session)."""
    if not ids:
        return {}
    return {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids), Device.removed_at.is_(None)))}


def load_deployments(session: Session, ids: Collection[str]) -> None:
    """Bring the deployments ``ids`` into the session in one query, so ``session.get`` needs none, and lock
    them (PostgreSQL; SQLite's write lock is already held) in id order: two replicas' batches naming the same
    deployments then queue for them instead of deadlocking, and none changes under this batch."""
    if ids:
        session.scalars(select(Deployment).where(Deployment.id.in_(ids)).order_by(Deployment.id)
                        .with_for_update()).all()


def device_by_name(session: Session, name: str) -> Device | None:
    return session.scalar(select(Device).where(Device.name == name, _LIVE))


def devices(session: Session) -> Sequence[Device]:
    return session.scalars(select(Device).where(_LIVE).order_by(Device.name)).all()


def broker_secrets(session: Session) -> list[tuple[str, str]]:
    """(device id, broker password hash) of every live device that has one: two columns, not whole rows (the
    leader reads them every few seconds, for every device)."""
    rows = session.execute(select(Device.id, Device.broker_secret)
                           .where(_LIVE, Device.broker_secret.is_not(None)).order_by(Device.name))
    return [(device_id, secret) for device_id, secret in rows if secret]


def devices_with_profile(session: Session, profile: str) -> Sequence[Device]:
    return session.scalars(select(Device).where(Device.profile_name == profile, _LIVE).order_by(Device.name)).all()


def shipped_releases(session: Session, deployment_ids: Collection[str]) -> dict[str, tuple[str, Release]]:
    """Deployment id -> (its device's id, the release it shipped, with the artifact loaded)."""
    if not deployment_ids:
        return {}
    rows = session.execute(
        select(Deployment.id, Deployment.device_id, Release)
        .join(Release, Deployment.release_id == Release.id)
        .where(Deployment.id.in_(deployment_ids))
        .options(selectinload(Release.artifact))
    )
    return {deployment_id: (device_id, release) for deployment_id, device_id, release in rows}


def recipe_of_file(session: Session, model_version_id: int, profile: str, sha256: str) -> str | None:
    """The recipe a profile's report says built this model file, if the report still has it."""
    return session.scalar(
        select(Variant.recipe)
        .where(Variant.model_version_id == model_version_id, Variant.profile_name == profile,
               Variant.sha256 == sha256)
        .limit(1)
    )


def models(session: Session) -> Sequence[Model]:
    """Every model by name, with its versions loaded."""
    return session.scalars(select(Model).order_by(Model.name).options(selectinload(Model.versions))).all()


def artifacts_of(session: Session, model_version_ids: Collection[int]) -> Sequence[Artifact]:
    """What these model versions ship, per profile."""
    if not model_version_ids:
        return []
    return session.scalars(
        select(Artifact).where(Artifact.model_version_id.in_(model_version_ids))
        .order_by(Artifact.model_version_id, Artifact.profile_name)
    ).all()


def model_by_name(session: Session, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.name == name))


def model_version(session: Session, model: Model, version: int | None) -> ModelVersion | None:
    query = select(ModelVersion).where(ModelVersion.model_id == model.id)
    if version is None:
        return session.scalar(query.order_by(ModelVersion.version.desc()).limit(1))
    return session.scalar(query.where(ModelVersion.version == version))


def next_version_number(session: Session, model: Model) -> int:
    """max + 1, with the model's row locked until commit, so two processes adding versions take turns."""
    session.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    current = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id))
    return (current or 0) + 1


def artifact_for_ids(session: Session, model_version_id: int, profile: str) -> Artifact | None:
    return session.scalar(
        select(Artifact).where(Artifact.model_version_id == model_version_id, Artifact.profile_name == profile)
    )


def variants_of(session: Session, model_version_id: int, profile: str | None = None) -> Sequence[Variant]:
    query = select(Variant).where(Variant.model_version_id == model_version_id)
    if profile is not None:
        query = query.where(Variant.profile_name == profile)
    return session.scalars(query.order_by(Variant.profile_name, Variant.id)).all()


def servable_blob(session: Session, sha256: str) -> bool:
    """Only files that a signed release or an open measurement (``server/measurements.py``) names are served
    to agents."""
    named = exists().where(or_(Release.model_sha256 == sha256, Release.eval_sha256 == sha256))
    measured = exists().where(Measurement.state == "pending",
                              or_(Measurement.model_sha256 == sha256, Measurement.eval_sha256 == sha256))
    return bool(session.scalar(select(or_(named, measured))))


def rollout(session: Session, rollout_id: str) -> Rollout | None:
    return session.get(Rollout, rollout_id)


def live_rollouts(session: Session, stopped_since: datetime) -> Sequence[Rollout]:
    """Rollouts the engine still drives, newest first: running, paused, succeeded (newcomers converge), and
    those rolled back or aborted since ``stopped_since`` (a device may still finish what was withdrawn)."""
    return session.scalars(
        select(Rollout)
        .where(or_(Rollout.state.in_(("running", "paused", "succeeded")),
                   and_(Rollout.state.in_(("rolled_back", "aborted")), Rollout.finished_at >= stopped_since)))
        .order_by(Rollout.created_at.desc(), Rollout.id.desc())
    ).all()


def latest_deployment_by_device(session: Session) -> dict[str, Deployment]:
    """Each device's deployment with the highest sequence number."""
    newest = (select(Deployment.device_id, func.max(Deployment.seq).label("seq"))
              .group_by(Deployment.device_id).subquery())
    rows = session.scalars(
        select(Deployment).join(newest, and_(Deployment.device_id == newest.c.device_id,
                                             Deployment.seq == newest.c.seq))
    ).all()
    return {d.device_id: d for d in rows}


def deployments_by_ids(session: Session, ids: Collection[str]) -> Sequence[Deployment]:
    return session.scalars(select(Deployment).where(Deployment.id.in_(ids))).all()


def audited_devices(session: Session, kind: str, rollout_id: str) -> set[str | None]:
    """The devices this rollout's audit log has an entry of ``kind`` for (to log some things once)."""
    return set(session.scalars(select(AuditEvent.device_id).where(AuditEvent.kind == kind,
                                                                  AuditEvent.rollout_id == rollout_id)))


def audit_events(
    session: Session, *, rollout_id: str | None = None, device_id: str | None = None, limit: int | None = None,
    since: datetime | None = None,
) -> Sequence[AuditEvent]:
    """Oldest first (the newest ``limit`` when given), from ``since`` on when given."""
    query = select(AuditEvent)
    if since is not None:
        query = query.where(AuditEvent.ts >= since)
    if rollout_id is not None:
        query = query.where(AuditEvent.rollout_id == rollout_id)
    if device_id is not None:
        query = query.where(AuditEvent.device_id == device_id)
    if limit is not None:
        newest = session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)).all()
        return list(reversed(newest))
    return session.scalars(query.order_by(AuditEvent.id)).all()


def unpublished_deployments(session: Session) -> Sequence[Deployment]:
    """Deployments of live devices whose desired state is to be published: new ones, ones to send again, and
    ones withdrawn after they were sent (the engine clears their retained desired state)."""
    return session.scalars(
        select(Deployment)
        .options(undefer(Deployment.directive))  # each is signed or re-sent: loaded with the row, not one by one
        .join(Device, Deployment.device_id == Device.id)
        .where(Deployment.published_at.is_(None), _LIVE)
        .order_by(Deployment.created_at, Deployment.seq)
    ).all()


def superseded_unsent_deployments(session: Session) -> Sequence[Deployment]:
    """Deployments never sent whose device has since been given a newer directive: it will never see them."""
    return session.scalars(
        select(Deployment)
        .join(Device, Deployment.device_id == Device.id)
        .where(
            Deployment.seq < Device.directive_seq,
            Deployment.state.not_in(FINAL_STATES),
            Deployment.published_at.is_(None),
        )
    ).all()


def open_deployments(session: Session, device_id: str, *, below_seq: int | None = None) -> Sequence[Deployment]:
    """The device's deployments that have not reached a final state (only those numbered below ``below_seq``)."""
    query = select(Deployment).where(Deployment.device_id == device_id, Deployment.state.not_in(FINAL_STATES))
    if below_seq is not None:
        query = query.where(Deployment.seq < below_seq)
    return session.scalars(query.order_by(Deployment.seq)).all()


def latest_deployment(session: Session, device_id: str) -> Deployment | None:
    return session.scalar(
        select(Deployment).where(Deployment.device_id == device_id).order_by(Deployment.seq.desc()).limit(1)
    )


def release(session: Session, release_id: int) -> Release | None:
    return session.get(Release, release_id)


def newest_signed_release(session: Session, artifact_id: int) -> Release | None:
    """The newest release of an artifact that is signed (not one only prepared for offline signing)."""
    return session.scalar(
        select(Release).where(Release.artifact_id == artifact_id, Release.manifest_sha256 != "")
        .order_by(Release.id.desc()).limit(1)
    )


def event_seen(session: Session, device_id: str, boot_id: str, seq: int) -> bool:
    return bool(
        session.scalar(
            select(
                exists().where(EventRecord.device_id == device_id, EventRecord.boot_id == boot_id, EventRecord.seq == seq)
            )
        )
    )


def telemetry_seen(session: Session, device_id: str, boot_id: str, seq: int) -> bool:
    return bool(
        session.scalar(
            select(
                exists().where(
                    TelemetryRecord.device_id == device_id,
                    TelemetryRecord.boot_id == boot_id,
                    TelemetryRecord.seq == seq,
                )
            )
        )
    )


def rollout_state_counts(session: Session) -> dict[str, int]:
    """How many rollouts are in each state (states with none left out)."""
    rows = session.execute(select(Rollout.state, func.count()).group_by(Rollout.state)).all()
    return {state: count for state, count in rows}


def recent_rollouts(session: Session, limit: int = 20) -> Sequence[Rollout]:
    return session.scalars(select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id.desc()).limit(limit)).all()


def recent_trials(session: Session, device_id: str, limit: int = 20) -> Sequence[TelemetryRecord]:
    return session.scalars(
        select(TelemetryRecord)
        .where(TelemetryRecord.device_id == device_id, TelemetryRecord.kind == "trial")
        .order_by(TelemetryRecord.ts.desc())
        .limit(limit)
    ).all()


def load_error_recorded(session: Session, model_sha256: str, runtime: str, deployment_id: str) -> bool:
    return bool(
        session.scalar(
            select(
                exists().where(
                    LoadErrorRecord.model_sha256 == model_sha256,
                    LoadErrorRecord.runtime == runtime,
                    LoadErrorRecord.deployment_id == deployment_id,
                )
            )
        )
    )


def load_error_reports(
    session: Session, model_sha256s: Collection[str], runtime: str | None = None
) -> list[tuple[LoadErrorRecord, str]]:
    """Reports on these model files (and runtime), oldest first, each with the reporting device's name
    (its id if the device is gone)."""
    query = (
        select(LoadErrorRecord, func.coalesce(Device.name, LoadErrorRecord.device_id))
        .outerjoin(Device, Device.id == LoadErrorRecord.device_id)
        .where(LoadErrorRecord.model_sha256.in_(model_sha256s))
    )
    if runtime is not None:
        query = query.where(LoadErrorRecord.runtime == runtime)
    rows = session.execute(query.order_by(LoadErrorRecord.created_at, LoadErrorRecord.id))
    return [(record, name) for record, name in rows]


def claim_enrolment_token(session: Session, token_id: str, now: datetime, client: str) -> bool:
    """Mark a token used, unless someone already did: one UPDATE with the condition in it, so of two
    devices racing with the same token exactly one wins."""
    result = session.execute(
        update(EnrolmentToken)
        .where(EnrolmentToken.id == token_id, EnrolmentToken.used_at.is_(None))
        .values(used_at=now, used_from=client[:128])
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def next_directive_seq(session: Session, device: Device) -> int:
    """The device's next directive sequence number, counted up in the database (one UPDATE that locks its
    row until commit): two processes deploying to one device at once get different numbers.

    The UPDATE reads nothing another pending object could change, so it does not flush the session (an
    engine starting a wave of N devices would otherwise flush its growing rollout N times: quadratic)."""
    if device in session.new:  # not in the database yet: the UPDATE must find its row
        session.flush()
    with session.no_autoflush:
        seq = session.execute(
            update(Device).where(Device.id == device.id).values(directive_seq=Device.directive_seq + 1)
            .returning(Device.directive_seq).execution_options(synchronize_session=False)
        ).scalar_one()
    set_committed_value(device, "directive_seq", seq)
    return int(seq)
