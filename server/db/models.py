"""The registry schema (SQLAlchemy 2.0). Only ``server/db`` imports sqlalchemy.

Alembic migrations in ``server/db/migrations`` create exactly this schema; a
test compares the two.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True),
    }


class Profile(Base):
    __tablename__ = "profiles"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    quantization: Mapped[str] = mapped_column(String(32))  # the preferred one
    threads: Mapped[int] = mapped_column(Integer, default=1)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    # what the device can run well, comma-separated; auto builds its candidates from these
    quantizations: Mapped[str] = mapped_column(String(200), default="", server_default=text("''"))
    recipe: Mapped[str] = mapped_column(String(200), default="auto", server_default="auto")  # or a fixed recipe
    objective: Mapped[str] = mapped_column(String(16), default="latency", server_default="latency")  # or "size"
    # max accuracy drop vs float32 that auto accepts
    accuracy_budget: Mapped[float] = mapped_column(Float, default=0.01, server_default="0.01")
    max_model_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    max_ram_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class Device(Base):
    __tablename__ = "devices"
    # a removed device keeps its row (its deployments' history names it) but frees its name
    __table_args__ = (
        Index("ix_devices_live_name", "name", unique=True, sqlite_where=text("removed_at IS NULL"),
              postgresql_where=text("removed_at IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    profile_name: Mapped[str] = mapped_column(ForeignKey("profiles.name"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    # When its last hello (a fresh start) was applied: a device is only taken for reset to a blank slot when
    # it said hello after its deployment committed, not because a replica applied an older state late.
    last_hello_at: Mapped[datetime | None] = mapped_column(default=None)
    boot_id: Mapped[str | None] = mapped_column(String(64), default=None)
    runtime: Mapped[str | None] = mapped_column(String(64), default=None)
    update_state: Mapped[str | None] = mapped_column(String(32), default=None)
    directive_seq: Mapped[int] = mapped_column(Integer, default=0)
    active_deployment_id: Mapped[str | None] = mapped_column(String(64), default=None)
    active_model: Mapped[str | None] = mapped_column(String(128), default=None)
    active_version: Mapped[int | None] = mapped_column(Integer, default=None)
    active_quantization: Mapped[str | None] = mapped_column(String(32), default=None)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))  # {key: value}, both strings
    removed_at: Mapped[datetime | None] = mapped_column(default=None)
    # the directive sequence number the device last said it trusts: lower than what it was sent = it was reset
    reported_seq: Mapped[int | None] = mapped_column(Integer, default=None)
    # the device's broker identity: the PBKDF2 hash of its password (server/broker_setup.py); None: none issued
    broker_secret: Mapped[str | None] = mapped_column(String(200), default=None)

    profile: Mapped[Profile] = relationship()


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model", order_by="ModelVersion.version")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version: Mapped[int] = mapped_column(Integer)
    source_sha256: Mapped[str] = mapped_column(String(64))  # the uploaded Keras file, in the blob store
    source_name: Mapped[str] = mapped_column(String(255))
    eval_sha256: Mapped[str] = mapped_column(String(64))  # the bounded eval slice that travels (npz)
    eval_samples: Mapped[int] = mapped_column(Integer)
    num_classes: Mapped[int] = mapped_column(Integer)
    reference_accuracy: Mapped[float] = mapped_column(Float)  # float model on the eval slice
    train_sha256: Mapped[str | None] = mapped_column(String(64), default=None)  # for steps that retrain
    full_eval_sha256: Mapped[str | None] = mapped_column(String(64), default=None)  # the whole eval set, host-side
    # False when the eval file had no labels: its y is the float model's top-1, so accuracy reads as agreement
    eval_labelled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")


class Artifact(Base):
    """One compressed variant of a model version, built for one profile."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("model_version_id", "profile_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    profile_name: Mapped[str] = mapped_column(ForeignKey("profiles.name"))
    quantization: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))  # the .tflite file in the blob store
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    host_accuracy: Mapped[float] = mapped_column(Float)
    host_p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    host_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    recipe: Mapped[str] = mapped_column(String(200), default="", server_default=text("''"))
    gzip_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)

    model_version: Mapped[ModelVersion] = relationship()


class Variant(Base):
    """One row of a model version's compression report for one profile."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("model_version_id", "profile_name", "recipe"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    profile_name: Mapped[str] = mapped_column(ForeignKey("profiles.name"))
    recipe: Mapped[str] = mapped_column(String(200))
    quantization: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)  # None when the build failed
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    gzip_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    agreement: Mapped[float | None] = mapped_column(Float, default=None)  # top-1 agreement with float32
    p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # ops, zero fraction, ranks, fallbacks
    verdict: Mapped[str] = mapped_column(String(32), default="")  # chosen | ok | over_budget | too_big | failed
    reason: Mapped[str] = mapped_column(Text, default="")
    chosen: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LoadErrorRecord(Base):
    """One device's report that its interpreter could not load a model file (the rule: server/load_errors.py)."""

    __tablename__ = "load_error_reports"
    # one report per deployment: a redelivered or reconciled outcome counts once
    __table_args__ = (UniqueConstraint("model_sha256", "runtime", "deployment_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(64))  # "<name> <version>", as devices report it
    device_id: Mapped[str] = mapped_column(String(64))
    deployment_id: Mapped[str | None] = mapped_column(String(64), default=None)  # None only if migrated from 0002
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Release(Base):
    """A signed manifest for one artifact; ``id`` is the monotonic release counter."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"))
    manifest: Mapped[dict[str, Any]] = mapped_column()  # SignedEnvelope as JSON
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the files the manifest names: exactly what the chunk server may serve
    model_sha256: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    eval_sha256: Mapped[str | None] = mapped_column(String(64), default=None, index=True)

    artifact: Mapped[Artifact] = relationship()


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    state: Mapped[str] = mapped_column(String(32), default="running")  # a RolloutState value
    max_accuracy_drop: Mapped[float] = mapped_column(Float)
    min_accuracy: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # {"profiles": [...], "tags": {k: v}, "devices": [names]}: re-resolved while the rollout is live
    selection: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))  # server.rollouts.policy.RolloutPolicy
    state_reason: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    actor: Mapped[str] = mapped_column(String(128), default="", server_default=text("''"))  # who started it

    model_version: Mapped[ModelVersion] = relationship()
    deployments: Mapped[list[Deployment]] = relationship(back_populates="rollout", order_by="Deployment.created_at")
    waves: Mapped[list[Wave]] = relationship(order_by="Wave.index")
    releases: Mapped[list[RolloutRelease]] = relationship()


class RolloutRelease(Base):
    """The release a rollout ships to one profile (signed at planning, or when a device of a new profile joins)."""

    __tablename__ = "rollout_releases"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    profile_name: Mapped[str] = mapped_column(ForeignKey("profiles.name"), primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))

    release: Mapped[Release] = relationship()


class Wave(Base):
    """One wave of a rollout; ``target_count`` is cumulative, fixed when the wave starts."""

    __tablename__ = "waves"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[str] = mapped_column(String(16))  # "1", "10%", ...
    state: Mapped[str] = mapped_column(String(32), default="waiting")  # a WaveState value
    target_count: Mapped[int | None] = mapped_column(Integer, default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    decided_at: Mapped[datetime | None] = mapped_column(default=None)
    gates: Mapped[list[Any]] = mapped_column(default=list)  # the last measurement: [{name, measured, ...}]


class Deployment(Base):
    """One device's part of a rollout."""

    __tablename__ = "deployments"
    # Every report looks up its device's open deployments, and the engine a rollout's: without these, each
    # was a scan of every deployment ever made (quadratic in a rollout's size).
    __table_args__ = (
        Index("ix_deployments_device_seq", "device_id", "seq"),
        Index("ix_deployments_rollout", "rollout_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"))
    seq: Mapped[int] = mapped_column(Integer)  # per-device directive sequence number
    min_accuracy_gate: Mapped[float] = mapped_column(Float)
    # SignedEnvelope as JSON, loaded only when read: the engine and ingest load deployments by the thousand
    directive: Mapped[dict[str, Any] | None] = mapped_column(default=None, deferred=True)
    state: Mapped[str] = mapped_column(String(32), default="pending")
    reason: Mapped[str] = mapped_column(Text, default="")
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    wave: Mapped[int | None] = mapped_column(Integer, default=None)
    kind: Mapped[str] = mapped_column(String(16), default="install", server_default="install")  # or "revert"
    reverts_id: Mapped[str | None] = mapped_column(String(64), default=None)  # the install a revert undoes
    previous_release_id: Mapped[int | None] = mapped_column(ForeignKey("releases.id"), default=None)
    previous_accuracy: Mapped[float | None] = mapped_column(Float, default=None)  # replaced model, same trial
    previous_p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    timed_out_at: Mapped[datetime | None] = mapped_column(default=None)
    # Optimistic locking: every ORM UPDATE checks and bumps it, so of two replicas changing one deployment
    # at once (a device's report, the engine's cancel) the later commit fails and is tried again on fresh
    # data instead of silently undoing the other (READ COMMITTED on PostgreSQL would let it).
    row_version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))

    rollout: Mapped[Rollout] = relationship(back_populates="deployments")
    device: Mapped[Device] = relationship()
    release: Mapped[Release] = relationship(foreign_keys=[release_id])
    previous_release: Mapped[Release | None] = relationship(foreign_keys=[previous_release_id])

    __mapper_args__ = {"version_id_col": row_version}  # noqa: RUF012 - read by the mapper, never mutated


class AuditEvent(Base):
    """The append-only log of every rollout decision and operator action, with its numbers."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))  # e.g. rollout.started, wave.gate_failed, device.timed_out
    actor: Mapped[str] = mapped_column(String(128), default="server")  # "server" or "operator <user>@<host>"
    rollout_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class EventRecord(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("device_id", "boot_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    boot_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    deployment_id: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class TelemetryRecord(Base):
    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("device_id", "boot_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    boot_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    deployment_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    ts: Mapped[float] = mapped_column(Float)
    p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    body: Mapped[dict[str, Any]] = mapped_column()
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServingReportRecord(Base):
    """One serving report (telemetry kind "serving"): what a device's served model did in one interval.

    Kept raw for the raw retention, then merged into ``serving_rollups`` and deleted in the same transaction
    (``server/latency/retention.py``), so every report is counted in exactly one of the two tables.
    """

    __tablename__ = "serving_reports"
    __table_args__ = (
        UniqueConstraint("device_id", "boot_id", "seq"),  # a redelivered or resent report counts once
        Index("ix_serving_reports_device_end", "device_id", "end_ts"),
        Index("ix_serving_reports_profile_end", "profile", "end_ts"),
        Index("ix_serving_reports_model_end", "model", "version", "end_ts"),
        Index("ix_serving_reports_end", "end_ts"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    boot_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    deployment_id: Mapped[str | None] = mapped_column(String(64), default=None)
    profile: Mapped[str] = mapped_column(String(64))  # the device's profile when the report arrived
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    quantization: Mapped[str] = mapped_column(String(32))
    runtime: Mapped[str] = mapped_column(String(64))
    threads: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))  # "traffic" | "rebenchmark"
    start_ts: Mapped[float] = mapped_column(Float)
    end_ts: Mapped[float] = mapped_column(Float)
    calls: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(Integer)
    invoke: Mapped[dict[str, Any]] = mapped_column()  # LatencyHistogram.to_json()
    e2e: Mapped[dict[str, Any]] = mapped_column()
    p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p90_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p99_ms: Mapped[float | None] = mapped_column(Float, default=None)
    load_1m: Mapped[float | None] = mapped_column(Float, default=None)
    cpu_percent: Mapped[float | None] = mapped_column(Float, default=None)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    temperature_c: Mapped[float | None] = mapped_column(Float, default=None)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServingRollup(Base):
    """Serving reports older than the raw retention, merged per device, model version, source and time step
    (``bucket``: epoch seconds, a multiple of the rollup step, holding reports whose interval ended in it)."""

    __tablename__ = "serving_rollups"
    __table_args__ = (
        UniqueConstraint("device_id", "model", "version", "source", "bucket"),
        Index("ix_serving_rollups_device_bucket", "device_id", "bucket"),
        Index("ix_serving_rollups_profile_bucket", "profile", "bucket"),
        Index("ix_serving_rollups_model_bucket", "model", "version", "bucket"),
        Index("ix_serving_rollups_bucket", "bucket"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))
    bucket: Mapped[int] = mapped_column(BigInteger)
    calls: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)
    invoke: Mapped[dict[str, Any]] = mapped_column()
    e2e: Mapped[dict[str, Any]] = mapped_column()


class ServingTotal(Base):
    """Cumulative serving numbers per profile and model version since the database was created: updated with
    every stored report, never reduced by retention (Prometheus counters and histograms read it)."""

    __tablename__ = "serving_totals"

    profile: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    invoke: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiToken(Base):
    """A bearer token for the HTTP API and dashboard. Only its sha256 is stored; the token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public, names the token in lists and logs
    name: Mapped[str] = mapped_column(String(64), unique=True)  # who holds it; the audit log's actor
    scope: Mapped[str] = mapped_column(String(16))  # "read", "operator" or "metrics"
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class EnrolmentToken(Base):
    """A one-time, expiring token a device trades for its broker identity, CA and trust root."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    used_from: Mapped[str | None] = mapped_column(String(128), default=None)  # the enrolling client's address


class ServerLease(Base):
    """Something one server replica does at a time (the rollout engine). ``expires_at`` is in seconds on the
    DATABASE's clock (replicas' clocks may disagree), written only by ``server/db/leases.py``."""

    __tablename__ = "server_leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))  # "" or the holding process's id (replica name + token)
    expires_at: Mapped[float] = mapped_column(Float)
    acquired_at: Mapped[float] = mapped_column(Float)


class ServerReplica(Base):
    """A server replica that started once against this database; its broker identity follows from its name."""

    __tablename__ = "server_replicas"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)


class Measurement(Base):
    """A benchmark-only trial of one build candidate on one device (``model build --measure-on``). The
    command (a director-signed order and the candidate's release-signed manifest) is kept whole: the server
    sends it until the device reports, and the build reads the result back."""

    __tablename__ = "measurements"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    profile_name: Mapped[str] = mapped_column(String(64))
    recipe: Mapped[str] = mapped_column(String(200))
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    eval_sha256: Mapped[str] = mapped_column(String(64))
    command: Mapped[dict[str, Any]] = mapped_column()  # the encoded Command, as published
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | failed | expired
    expires_at: Mapped[datetime] = mapped_column()
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    p50_ms: Mapped[float | None] = mapped_column(Float, default=None)
    p95_ms: Mapped[float | None] = mapped_column(Float, default=None)
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    runtime: Mapped[str] = mapped_column(String(64), default="")
    threads: Mapped[int | None] = mapped_column(Integer, default=None)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    position: Mapped[int] = mapped_column(Integer, default=0)  # order within its build: rows of one flush share a time
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    device: Mapped[Device] = relationship()
