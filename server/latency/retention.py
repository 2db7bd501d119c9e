"""Retention with downsampling: raw serving reports for a day, per-minute rollups for a month (configurable).

``compact`` merges raw reports older than the raw retention into rollup rows
(one per device, model version, source and step, keyed by the step in which
a report's interval ended; merged into the row already there, if any) and
deletes them in the same transaction, a bounded batch per transaction, so a
reader sees each report exactly once, raw or rolled up. Rollups older than
their retention are deleted. The totals table is never touched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from server.db import Database, latency_queries
from server.db.models import ServingRollup
from server.latency.timespec import format_duration
from shared.errors import UserInputError
from shared.failpoints import failpoint
from shared.histogram import LatencyHistogram

logger = logging.getLogger(__name__)

DEFAULT_RAW_RETENTION_S = 86400.0
DEFAULT_ROLLUP_STEP_S = 60.0
DEFAULT_ROLLUP_RETENTION_S = 30 * 86400.0
BATCH = 2000  # raw reports per transaction
COMPACT_INTERVAL_S = 60.0  # how often the server compacts


@dataclass(frozen=True)
class RetentionPolicy:
    raw_retention_s: float = DEFAULT_RAW_RETENTION_S
    rollup_step_s: float = DEFAULT_ROLLUP_STEP_S
    rollup_retention_s: float = DEFAULT_ROLLUP_RETENTION_S

    def __post_init__(self) -> None:
        check_retention(self.raw_retention_s, self.rollup_step_s, self.rollup_retention_s)

    def describe(self) -> str:
        return (f"raw {format_duration(self.raw_retention_s)}, {format_duration(self.rollup_step_s)} rollups for "
                f"{format_duration(self.rollup_retention_s)}")


def check_retention(raw_retention_s: float, rollup_step_s: float, rollup_retention_s: float) -> None:
    """UserInputError unless every duration is positive, the step whole seconds and at most the raw retention,
    and rollups are kept at least as long as raw reports."""
    for name, value in (("raw retention", raw_retention_s), ("rollup step", rollup_step_s),
                        ("rollup retention", rollup_retention_s)):
        if not (math.isfinite(value) and value > 0):
            raise UserInputError(f"the {name} must be more than zero seconds, got {value:g}")
    if rollup_step_s != int(rollup_step_s):
        raise UserInputError(f"the rollup step must be whole seconds, got {rollup_step_s:g}")
    if rollup_step_s > raw_retention_s:
        raise UserInputError(f"the rollup step ({format_duration(rollup_step_s)}) must not be longer than the raw "
                             f"retention ({format_duration(raw_retention_s)})")
    if rollup_retention_s < raw_retention_s:
        raise UserInputError(f"the rollup retention ({format_duration(rollup_retention_s)}) must not be shorter "
                             f"than the raw retention ({format_duration(raw_retention_s)})")


@dataclass(frozen=True)
class Compaction:
    raw_compacted: int  # raw reports merged into rollups and deleted
    rollups_deleted: int  # rollups past their retention


def bucket_of(ts: float, step_s: float) -> int:
    """The start (epoch seconds) of the rollup step ``ts`` falls in."""
    return int(math.floor(ts / step_s) * step_s)


def compact(db: Database, now: float, *, raw_retention_s: float = DEFAULT_RAW_RETENTION_S,
            rollup_step_s: float = DEFAULT_ROLLUP_STEP_S,
            rollup_retention_s: float = DEFAULT_ROLLUP_RETENTION_S, batch: int = BATCH) -> Compaction:
    """Downsample raw reports older than ``now - raw_retention_s`` and drop rollups older than
    ``now - rollup_retention_s``."""
    check_retention(raw_retention_s, rollup_step_s, rollup_retention_s)
    cutoff = now - raw_retention_s
    compacted = 0
    while True:
        with db.session() as session:
            reports = latency_queries.oldest_raw_reports(session, cutoff, batch)
            rollups: dict[tuple[str, str, int, str, int], ServingRollup] = {}
            for report in reports:
                key = (report.device_id, report.model, report.version, report.source,
                       bucket_of(report.end_ts, rollup_step_s))
                row = rollups.get(key)
                if row is None:
                    row = latency_queries.locked_rollup(session, key[0], report.profile, *key[1:])
                    rollups[key] = row
                row.calls += report.calls
                row.errors += report.errors
                row.samples += report.samples
                row.invoke = _merged(row.invoke, report.invoke)
                row.e2e = _merged(row.e2e, report.e2e)
            deleted = latency_queries.delete_raw_reports(session, [r.id for r in reports])
            assert deleted == len(reports), "raw reports vanished under compaction"
            failpoint("server.latency.rolled_up")  # merged and deleted, not committed
        failpoint("server.latency.compacted")  # one batch committed
        compacted += len(reports)
        if len(reports) < batch:
            break
    with db.session() as session:
        dropped = latency_queries.delete_rollups_before(session, now - rollup_retention_s)
    if compacted or dropped:
        logger.info("latency retention: %d raw report(s) rolled up, %d old rollup(s) deleted", compacted, dropped)
    return Compaction(raw_compacted=compacted, rollups_deleted=dropped)


def compact_with(db: Database, now: float, policy: RetentionPolicy) -> Compaction:
    return compact(db, now, raw_retention_s=policy.raw_retention_s, rollup_step_s=policy.rollup_step_s,
                   rollup_retention_s=policy.rollup_retention_s)


def _merged(stored: dict[str, object], more: dict[str, object]) -> dict[str, object]:
    histogram = LatencyHistogram.from_json(stored)
    histogram.add(LatencyHistogram.from_json(more))
    return histogram.to_json()
