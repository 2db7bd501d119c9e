"""A batch's event and telemetry reports stored at once: one multi-row ``INSERT … ON CONFLICT DO NOTHING``
per table, after one query for the batch's devices and one for the deployments they name.

The rules are ``server/ingest.py``'s: a report already stored (a QoS 1 redelivery, a resend before the
ack, or the same report twice in the batch) is a duplicate, stored once and acknowledged again; one from
an unknown or removed device is dropped. ``RETURNING`` says which rows are new, and only a new report is
applied (``apply_new_report``), once. Serving reports go to the latency store one by one, not here.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete

from server.db import Session, queries
from server.db.models import Device, EventRecord, TelemetryRecord
from server.db.upserts import insert_new
from server.ingest import apply_new_event, apply_new_telemetry, event_row, telemetry_row
from shared.messages import Event, Telemetry
from shared.topics import TopicKind

logger = logging.getLogger(__name__)

Report = Event | Telemetry
KEY = ("device_id", "boot_id", "seq")  # the unique constraint of both tables


class Stored(enum.Enum):
    NEW = "new"  # inserted by this batch: apply it
    DUPLICATE = "duplicate"  # stored before, or earlier in this batch
    UNKNOWN_DEVICE = "unknown_device"  # dropped


def is_batched_report(kind: TopicKind, message: object) -> bool:
    """Events and trial telemetry go through ``store_reports``; serving telemetry does not."""
    return (kind is TopicKind.EVENTS and isinstance(message, Event)) or (
        kind is TopicKind.TELEMETRY and isinstance(message, Telemetry) and message.kind != "serving")


def _table(report: Report) -> type[EventRecord | TelemetryRecord]:
    return EventRecord if isinstance(report, Event) else TelemetryRecord


@dataclass
class StoredReports:
    """What ``store_reports`` did with each report, in the order given, and the devices they came from."""

    outcomes: list[Stored]
    devices: dict[str, Device] = field(default_factory=dict)


def store_reports(session: Session, reports: Sequence[Report], devices: dict[str, Device] | None = None) -> StoredReports:
    """``devices``: the batch's live devices by id, if the caller looked them up already."""
    if devices is None:
        devices = queries.live_devices(session, {r.device_id for r in reports})
    queries.load_deployments(session, {r.deployment_id for r in reports if r.deployment_id})
    outcomes: list[Stored | None] = []
    rows: dict[type[EventRecord | TelemetryRecord], list[dict[str, object]]] = {EventRecord: [], TelemetryRecord: []}
    first: set[tuple[type, str, str, int]] = set()
    for report in reports:
        if report.device_id not in devices:
            logger.warning("dropped a report from unknown or removed device %s", report.device_id)
            outcomes.append(Stored.UNKNOWN_DEVICE)
            continue
        table = _table(report)
        key = (table, report.device_id, report.boot_id, report.seq)
        if key in first:
            outcomes.append(Stored.DUPLICATE)
            continue
        first.add(key)
        outcomes.append(None)  # decided by the insert
        if isinstance(report, Event):
            rows[table].append(event_row(report.device_id, report))
        else:
            rows[table].append(telemetry_row(report.device_id, report))
    new = {(table, *key) for table, table_rows in rows.items()
           for key in insert_new(session, table, table_rows, KEY, returning=KEY)}
    decided = [outcome if outcome is not None else
               Stored.NEW if (_table(report), report.device_id, report.boot_id, report.seq) in new else Stored.DUPLICATE
               for outcome, report in zip(outcomes, reports, strict=True)]
    return StoredReports(decided, devices)


def changes_more(report: Report) -> bool:
    """Whether applying ``report`` may change more than its own row (it names a deployment); the loop
    spares a savepoint for the ones that cannot."""
    return report.deployment_id is not None and not (isinstance(report, Event) and report.is_rejection)


def apply_new_report(session: Session, device: Device, report: Report) -> None:
    if isinstance(report, Event):
        apply_new_event(session, device, report)
    else:
        apply_new_telemetry(session, device, report)


def unstore_report(session: Session, report: Report) -> None:
    """Take back a report whose apply failed: unacknowledged, its redelivery is a new report again."""
    table = _table(report)
    session.execute(delete(table).where(table.device_id == report.device_id, table.boot_id == report.boot_id,
                                        table.seq == report.seq))
