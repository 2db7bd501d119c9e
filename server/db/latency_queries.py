"""Queries about served-model latency, for ``server.latency``.

A serving report lives in exactly one of two tables at any moment: raw in
``serving_reports`` until retention merges it into ``serving_rollups`` and
deletes it in the same transaction. Readers read both in one transaction
and so count every report once.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from server.db.models import EventRecord, ServingReportRecord, ServingRollup, ServingTotal
from server.db.upserts import insert_new
from shared.histogram import LatencyHistogram


@dataclass(frozen=True)
class ServingSlice:
    """One raw report or one rollup row, as the read model needs it. For a rollup ``start_ts`` and ``end_ts``
    are both its bucket's start."""

    device_id: str
    profile: str
    model: str
    version: int
    source: str
    start_ts: float
    end_ts: float
    calls: int
    errors: int
    samples: int
    invoke: dict[str, Any]
    e2e: dict[str, Any]


_RAW = ServingReportRecord
_ROLL = ServingRollup


def serving_report_seen(session: Session, device_id: str, boot_id: str, seq: int) -> bool:
    found = session.scalar(
        select(_RAW.id).where(_RAW.device_id == device_id, _RAW.boot_id == boot_id, _RAW.seq == seq).limit(1)
    )
    return found is not None


def serving_total(session: Session, profile: str, model: str, version: int) -> ServingTotal | None:
    return session.get(ServingTotal, (profile, model, version))


def locked_serving_total(session: Session, profile: str, model: str, version: int) -> ServingTotal:
    """The totals row of (profile, model, version), created empty if missing, locked until commit: two
    servers adding to it take turns instead of one overwriting the other's sum."""
    key = {"profile": profile, "model": model, "version": version}
    insert_new(session, ServingTotal, [{**key, "calls": 0, "errors": 0,
                                                  "invoke": LatencyHistogram().to_json()}], list(key))
    return session.scalars(select(ServingTotal).filter_by(**key).with_for_update()
                           .execution_options(populate_existing=True)).one()


def serving_totals(session: Session) -> Sequence[ServingTotal]:
    return session.scalars(select(ServingTotal).order_by(ServingTotal.profile, ServingTotal.model,
                                                         ServingTotal.version)).all()


def serving_slices(
    session: Session, *, since: float, until: float, device_ids: Collection[str] | None = None,
    profile: str | None = None, model: str | None = None, version: int | None = None,
) -> list[ServingSlice]:
    """Raw reports whose interval ended in [since, until) and rollups whose bucket starts there, by time."""
    raw = select(_RAW.device_id, _RAW.profile, _RAW.model, _RAW.version, _RAW.source, _RAW.start_ts, _RAW.end_ts,
                 _RAW.calls, _RAW.errors, _RAW.samples, _RAW.invoke, _RAW.e2e)
    raw = raw.where(_RAW.end_ts >= since, _RAW.end_ts < until)
    rolled = select(_ROLL.device_id, _ROLL.profile, _ROLL.model, _ROLL.version, _ROLL.source, _ROLL.bucket,
                    _ROLL.bucket, _ROLL.calls, _ROLL.errors, _ROLL.samples, _ROLL.invoke, _ROLL.e2e)
    rolled = rolled.where(_ROLL.bucket >= since, _ROLL.bucket < until)
    if device_ids is not None:
        raw, rolled = raw.where(_RAW.device_id.in_(device_ids)), rolled.where(_ROLL.device_id.in_(device_ids))
    if profile is not None:
        raw, rolled = raw.where(_RAW.profile == profile), rolled.where(_ROLL.profile == profile)
    if model is not None:
        raw, rolled = raw.where(_RAW.model == model), rolled.where(_ROLL.model == model)
    if version is not None:
        raw, rolled = raw.where(_RAW.version == version), rolled.where(_ROLL.version == version)
    rows = [_slice(row) for row in session.execute(rolled)]
    rows += [_slice(row) for row in session.execute(raw)]
    rows.sort(key=lambda s: (s.end_ts, s.start_ts))
    return rows


def _slice(row: Any) -> ServingSlice:
    device_id, profile, model, version, source, start_ts, end_ts, calls, errors, samples, invoke, e2e = row
    return ServingSlice(device_id, profile, model, int(version), source, float(start_ts), float(end_ts), int(calls),
                        int(errors), int(samples), invoke, e2e)


def last_model_before(session: Session, device_id: str, ts: float) -> tuple[str, int] | None:
    """The (model, version) of the device's last report that ended before ``ts``."""
    raw = session.execute(
        select(_RAW.end_ts, _RAW.model, _RAW.version).where(_RAW.device_id == device_id, _RAW.end_ts < ts)
        .order_by(_RAW.end_ts.desc()).limit(1)
    ).first()
    rolled = session.execute(
        select(_ROLL.bucket, _ROLL.model, _ROLL.version).where(_ROLL.device_id == device_id, _ROLL.bucket < ts)
        .order_by(_ROLL.bucket.desc()).limit(1)
    ).first()
    candidates = [row for row in (raw, rolled) if row is not None]
    if not candidates:
        return None
    _, model, version = max(candidates, key=lambda row: float(row[0]))
    return str(model), int(version)


def last_report_times(session: Session) -> dict[str, float]:
    """{device id: when its newest report (raw, or else rolled up) ended}."""
    times = {device: float(ts) for device, ts in session.execute(
        select(_ROLL.device_id, func.max(_ROLL.bucket)).group_by(_ROLL.device_id))}
    for device, ts in session.execute(select(_RAW.device_id, func.max(_RAW.end_ts)).group_by(_RAW.device_id)):
        times[device] = max(float(ts), times.get(device, float(ts)))
    return times


def committed_event_times(session: Session, deployment_ids: Collection[str]) -> dict[str, float]:
    """{deployment id: the device's clock when it reported committing it}."""
    if not deployment_ids:
        return {}
    rows = session.execute(
        select(EventRecord.deployment_id, func.min(EventRecord.ts))
        .where(EventRecord.deployment_id.in_(deployment_ids), EventRecord.state == "committed")
        .group_by(EventRecord.deployment_id)
    )
    return {deployment_id: float(ts) for deployment_id, ts in rows}


# -- retention ----------------------------------------------------------------------


def oldest_raw_reports(session: Session, before: float, limit: int) -> Sequence[ServingReportRecord]:
    """Locked until commit; rows another compaction holds are skipped (it rolls them up, not us)."""
    return session.scalars(select(_RAW).where(_RAW.end_ts < before).order_by(_RAW.end_ts, _RAW.id)
                           .limit(limit).with_for_update(skip_locked=True)).all()


def rollup(session: Session, device_id: str, model: str, version: int, source: str, bucket: int) -> ServingRollup | None:
    return session.scalar(select(_ROLL).where(_ROLL.device_id == device_id, _ROLL.model == model,
                                              _ROLL.version == version, _ROLL.source == source,
                                              _ROLL.bucket == bucket))


def locked_rollup(session: Session, device_id: str, profile: str, model: str, version: int, source: str,
                  bucket: int) -> ServingRollup:
    """The rollup row of the key, created empty if missing, locked until commit (as ``locked_serving_total``)."""
    key = {"device_id": device_id, "model": model, "version": version, "source": source, "bucket": bucket}
    empty = LatencyHistogram().to_json()
    insert_new(session, ServingRollup, [{**key, "profile": profile, "calls": 0, "errors": 0, "samples": 0,
                                                   "invoke": empty, "e2e": empty}], list(key))
    return session.scalars(select(_ROLL).filter_by(**key).with_for_update()
                           .execution_options(populate_existing=True)).one()


def delete_raw_reports(session: Session, ids: Collection[int]) -> int:
    if not ids:
        return 0
    return int(session.execute(delete(_RAW).where(_RAW.id.in_(ids))).rowcount)  # type: ignore[attr-defined]


def delete_rollups_before(session: Session, bucket: float) -> int:
    return int(session.execute(delete(_ROLL).where(_ROLL.bucket < bucket)).rowcount)  # type: ignore[attr-defined]
