"""Serving latency on the server: idempotent ingest, totals, series merged from buckets, retention, rollouts.

Every test works in its own copy of a data directory with ``digits:1`` (see
``conftest.py``) and feeds serving telemetry through ``server.ingest``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from sqlalchemy import func, select

from server.db import Database
from server.db.models import Deployment, ServingReportRecord, ServingRollup, ServingTotal
from server.devices import register_device
from server.ingest import apply_event
from server.latency import (
    MAX_POINTS,
    check_range,
    device_latency,
    latency_summary,
    latency_totals,
    model_latency,
    profile_latency,
    rollout_latency,
    rollout_latency_json,
    series_json,
    summary_json,
)
from server.latency.retention import compact
from server.setup import Workspace
from shared import PROTOCOL_VERSION
from shared.errors import NotFoundError, UserInputError
from shared.histogram import LatencyHistogram, bucket_of
from shared.messages import Event, UpdateState
from tests.server.latency_helpers import histogram, ingest, serving
from tests.server.rollout_helpers import start_all_at_once

T0 = 1_699_999_200.0  # an hour boundary
DAY = 86400.0


@dataclass(frozen=True)
class Fleet:
    db: Database
    cams: tuple[str, ...]  # device ids of cam-1..cam-3 (x86-64)
    pi: str  # device id of pi-1 (rpi4)


@pytest.fixture
def fleet(workspace: Workspace) -> Fleet:
    cams = tuple(register_device(workspace.db, f"cam-{i}", "x86-64").id for i in (1, 2, 3))
    pi = register_device(workspace.db, "pi-1", "rpi4").id
    return Fleet(workspace.db, cams, pi)


def _count(db: Database, table: type) -> int:
    with db.reading() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def _within_one_bucket(estimate: float | None, exact: float) -> bool:
    assert estimate is not None
    return abs(bucket_of(estimate) - bucket_of(exact)) <= 1


# -- ingest ---------------------------------------------------------------------------------


def test_a_redelivered_report_is_stored_once_and_a_new_boot_is_a_new_report(fleet: Fleet) -> None:
    cam = fleet.cams[0]
    report = serving(cam, 1, [2.0, 3.0, 4.0], end=T0)
    assert ingest(fleet.db, report, report) == [True, True]  # a duplicate inside one batch
    assert ingest(fleet.db, report) == [True]  # a QoS 1 redelivery in a later batch
    assert _count(fleet.db, ServingReportRecord) == 1
    (total,) = latency_totals(fleet.db)
    assert (total.profile, total.model, total.version, total.calls) == ("x86-64", "digits", 1, 3)

    ingest(fleet.db, serving(cam, 1, [5.0], end=T0 + 10, boot="boot-2"))  # seq restarts after a reboot
    assert _count(fleet.db, ServingReportRecord) == 2
    assert latency_totals(fleet.db)[0].calls == 4


def test_a_report_keeps_what_the_device_said(fleet: Fleet) -> None:
    ingest(fleet.db, serving(fleet.pi, 7, [1.0, 2.0], end=T0, errors=1, source="rebenchmark", deployment_id="d-1"))
    with fleet.db.reading() as session:
        row = session.scalars(select(ServingReportRecord)).one()
        assert (row.profile, row.source, row.calls, row.errors, row.samples, row.deployment_id) == (
            "rpi4", "rebenchmark", 3, 1, 2, "d-1")
        assert (row.start_ts, row.end_ts, row.rss_bytes, row.temperature_c) == (T0 - 10, T0, 50_000_000, 48.5)
        assert LatencyHistogram.from_json(row.invoke) == histogram([1.0, 2.0])


def test_serving_reports_of_unknown_devices_are_dropped(fleet: Fleet) -> None:
    assert ingest(fleet.db, serving("nobody", 1, [1.0], end=T0)) == [False]
    assert _count(fleet.db, ServingReportRecord) == 0
    assert _count(fleet.db, ServingTotal) == 0


def test_totals_are_the_sum_of_every_report_and_survive_retention(fleet: Fleet) -> None:
    rng = np.random.default_rng(1)
    messages = []
    for seq in range(1, 41):
        device = (fleet.cams + (fleet.pi,))[seq % 4]
        samples = rng.lognormal(1.0, 0.4, size=int(rng.integers(0, 20))).tolist()
        messages.append(serving(device, seq, samples, end=T0 + seq * 10, version=1 + seq % 2, errors=seq % 3))
    ingest(fleet.db, *messages)
    seen: list[int] = []
    for now in (T0 + 100, T0 + DAY + 200, T0 + DAY + 500):  # nothing, some, all compacted
        compact(fleet.db, now)
        totals = {(t.profile, t.version): t for t in latency_totals(fleet.db)}
        assert sum(t.calls for t in totals.values()) == sum(m.serving.calls for m in messages if m.serving)
        for (profile, version), total in totals.items():
            mine = [m.serving for m in messages if m.serving and m.serving.version == version
                    and (m.device_id == fleet.pi) == (profile == "rpi4")]
            assert total.calls == sum(r.calls for r in mine)
            assert total.errors == sum(r.errors for r in mine)
            assert total.histogram == LatencyHistogram.merged(LatencyHistogram.from_wire(r.invoke) for r in mine)
        seen.append(_count(fleet.db, ServingReportRecord))
    assert seen[0] == 40 and 0 < seen[1] < 40 and seen[2] == 0


# -- series ------------------------------------------------------------------------------------


def test_profile_percentiles_come_from_merged_buckets_of_every_device(fleet: Fleet) -> None:
    rng = np.random.default_rng(7)
    messages, by_minute = [], {}
    for seq in range(1, 61):  # 10 minutes of 10-second reports from three devices
        for i, cam in enumerate(fleet.cams):
            samples = rng.lognormal(0.5 + i * 0.4, 0.5, size=50).tolist()
            end = T0 + seq * 10
            messages.append(serving(cam, seq, samples, end=end))
            by_minute.setdefault(int((end - T0) // 60), []).extend(samples)
    messages.append(serving(fleet.pi, 1, [500.0], end=T0 + 30))  # another profile: not in this series
    ingest(fleet.db, *messages)

    series = profile_latency(fleet.db, "x86-64", since=T0, until=T0 + 700, step_s=60)
    everything = [s for samples in by_minute.values() for s in samples]
    assert sum(p.stats.calls for p in series.points) == len(everything)
    for point in series.points:
        samples = by_minute[int((point.start - T0) // 60)]
        assert point.stats.calls == len(samples)
        for q, value in ((50, point.stats.p50_ms), (90, point.stats.p90_ms), (99, point.stats.p99_ms)):
            assert _within_one_bucket(value, float(np.percentile(samples, q))), (point.start, q)
    (version,) = series.versions
    for q, value in ((50, version.stats.p50_ms), (95, version.stats.p95_ms), (99, version.stats.p99_ms)):
        assert _within_one_bucket(value, float(np.percentile(everything, q)))
    assert series.changes == ()

    model = model_latency(fleet.db, "digits", 1, since=T0, until=T0 + 700, step_s=700)
    assert model.points[0].stats.calls == len(everything) + 1  # every profile
    only = model_latency(fleet.db, "digits", 1, since=T0, until=T0 + 700, step_s=700, profile="rpi4")
    assert only.points[0].stats.calls == 1 and only.points[0].stats.p50_ms == pytest.approx(500, rel=0.1)


def test_a_device_series_marks_model_changes_and_keeps_versions_apart(fleet: Fleet) -> None:
    cam = fleet.cams[0]
    ingest(fleet.db, serving(cam, 1, [1.0] * 10, end=T0 - 30, version=1),  # before the range: the baseline
           serving(cam, 2, [1.0] * 10, end=T0 + 10, version=1),
           serving(cam, 3, [3.0] * 10, end=T0 + 20, version=2),
           serving(cam, 4, [3.0] * 10, end=T0 + 30, version=2, source="rebenchmark"))
    series = device_latency(fleet.db, "cam-1", since=T0, until=T0 + 60, step_s=15)
    assert [(p.start, p.stats.calls, p.sources) for p in series.points] == [
        (T0, 10, ("traffic",)), (T0 + 15, 10, ("traffic",)), (T0 + 30, 10, ("rebenchmark",))]
    assert [(c.version, c.previous_version, c.ts) for c in series.changes] == [(2, 1, T0 + 10)]
    assert [(v.version, v.stats.calls) for v in series.versions] == [(1, 10), (2, 20)]
    later = device_latency(fleet.db, "cam-1", since=T0 + 25, until=T0 + 60, step_s=5)
    assert later.changes == ()  # the version served before the range was already 2
    document = series_json(series)
    assert document["scope"] == "device" and document["name"] == "cam-1"
    assert document["points"][0]["p50_ms"] == series.points[0].stats.p50_ms
    assert document["changes"] == [{"ts": T0 + 10, "device": "cam-1", "model": "digits", "version": 2,
                                    "previous_version": 1}]


def test_latency_summary_covers_live_devices(fleet: Fleet) -> None:
    ingest(fleet.db, serving(fleet.cams[0], 1, [2.0] * 30, end=T0 - 10), serving(fleet.cams[0], 2, [2.0] * 30,
                                                                                  end=T0 - 400))
    summary = latency_summary(fleet.db, window_s=300, now=T0)
    assert set(summary) == set(fleet.cams) | {fleet.pi}
    one = summary[fleet.cams[0]]
    assert (one.device, one.profile, one.model, one.version, one.last_report) == ("cam-1", "x86-64", "digits", 1,
                                                                                   T0 - 10)
    assert one.stats.calls == 30 and one.calls_per_s == pytest.approx(0.1)
    idle = summary[fleet.pi]
    assert (idle.stats.calls, idle.stats.p50_ms, idle.last_report, idle.model) == (0, None, None, None)
    assert summary_json(one)["calls_per_s"] == pytest.approx(0.1)
    assert set(summary_json(summary)) == set(summary)


# -- ranges and names ----------------------------------------------------------------------------


@pytest.mark.parametrize(("since", "until", "step"), [
    (T0, T0, 60), (T0 + 1, T0, 60), (T0, T0 + 60, 0), (T0, T0 + 60, -1), (T0, T0 + MAX_POINTS + 1, 1),
    (math.nan, T0, 1), (T0, math.inf, 1),
])
def test_bad_ranges_are_user_errors(since: float, until: float, step: float) -> None:
    with pytest.raises(UserInputError):
        check_range(since, until, step)


def test_the_largest_range_allowed_is_max_points_steps() -> None:
    check_range(T0, T0 + MAX_POINTS, 1)


def test_unknown_names_are_not_found(fleet: Fleet) -> None:
    window = {"since": T0, "until": T0 + 60, "step_s": 60}
    with pytest.raises(NotFoundError, match="unknown device 'ghost'"):
        device_latency(fleet.db, "ghost", **window)
    with pytest.raises(NotFoundError, match="unknown profile 'toaster'"):
        profile_latency(fleet.db, "toaster", **window)
    with pytest.raises(NotFoundError, match="unknown model 'ghost'"):
        model_latency(fleet.db, "ghost", 1, **window)
    with pytest.raises(NotFoundError, match="no version 9"):
        model_latency(fleet.db, "digits", 9, **window)
    with pytest.raises(NotFoundError, match="unknown model"):
        profile_latency(fleet.db, "x86-64", model="ghost", **window)
    with pytest.raises(NotFoundError, match="unknown rollout 'r-ghost'"):
        rollout_latency(fleet.db, "r-ghost")
    with pytest.raises(UserInputError):  # checked before any lookup
        device_latency(fleet.db, "cam-1", since=T0, until=T0, step_s=60)


# -- retention ----------------------------------------------------------------------------------


def test_compaction_loses_and_doubles_no_call_across_the_raw_rollup_boundary(fleet: Fleet) -> None:
    rng = np.random.default_rng(3)
    messages = []
    for seq in range(1, 301):  # every 10 minutes over ~2 days, two devices
        for cam in fleet.cams[:2]:
            samples = rng.lognormal(1.0, 0.3, size=int(rng.integers(1, 8))).tolist()
            messages.append(serving(cam, seq, samples, end=T0 + seq * 600 + 7))
    ingest(fleet.db, *messages)
    now = T0 + 301 * 600
    window = {"since": T0, "until": now, "step_s": 3600.0}

    def numbers() -> tuple[int, list[int], dict[int, int]]:
        """Calls in the whole range, calls per hour, and calls per hour from the two devices' own series."""
        series = profile_latency(fleet.db, "x86-64", **window)
        (version,) = series.versions
        devices = [device_latency(fleet.db, cam, **window) for cam in ("cam-1", "cam-2")]
        counts = {i: sum(p.stats.calls for d in devices for p in d.points if int(p.start - T0) // 3600 == i)
                  for i in range(60)}
        return version.stats.calls, [p.stats.calls for p in series.points], counts

    calls, per_hour, per_device_hour = numbers()
    assert calls == sum(m.serving.calls for m in messages if m.serving)
    p95 = profile_latency(fleet.db, "x86-64", **window).versions[0].stats.p95_ms
    result = compact(fleet.db, now, raw_retention_s=DAY, rollup_step_s=60, batch=97)  # several batches
    assert result.raw_compacted > 0 and _count(fleet.db, ServingReportRecord) > 0  # the range spans both tables
    assert _count(fleet.db, ServingReportRecord) + result.raw_compacted == len(messages)
    assert numbers() == (calls, per_hour, per_device_hour)  # hour steps hold whole minutes: the same per step
    assert profile_latency(fleet.db, "x86-64", **window).versions[0].stats.p95_ms == pytest.approx(p95)
    compact(fleet.db, now)  # again: nothing more to do, nothing changes
    assert numbers()[0] == calls


def test_compaction_merges_into_an_existing_rollup(fleet: Fleet) -> None:
    cam = fleet.cams[0]
    ingest(fleet.db, serving(cam, 1, [1.0, 2.0], end=T0 + 5), serving(cam, 2, [3.0], end=T0 + 50))
    compact(fleet.db, T0 + DAY + 20)  # only the first is old enough
    compact(fleet.db, T0 + DAY + 60)  # the second joins the same minute's rollup
    with fleet.db.reading() as session:
        (row,) = session.scalars(select(ServingRollup)).all()
        assert (row.bucket, row.calls, row.samples) == (T0, 3, 3)
        assert LatencyHistogram.from_json(row.invoke) == histogram([1.0, 2.0, 3.0])
    assert _count(fleet.db, ServingReportRecord) == 0


def test_retention_deletes_old_rollups_but_not_totals(fleet: Fleet) -> None:
    cam = fleet.cams[0]
    ingest(fleet.db, serving(cam, 1, [1.0], end=T0 + 5), serving(cam, 2, [1.0], end=T0 + 20 * DAY))
    compact(fleet.db, T0 + 25 * DAY)
    assert _count(fleet.db, ServingRollup) == 2
    result = compact(fleet.db, T0 + 31 * DAY)
    assert result.rollups_deleted == 1 and _count(fleet.db, ServingRollup) == 1
    assert latency_totals(fleet.db)[0].calls == 2


@pytest.mark.parametrize(("raw", "step", "rollups"), [(0, 60, DAY), (DAY, 0, DAY), (60, 120, DAY), (DAY, 1.5, DAY),
                                                       (DAY, 60, 3600)])
def test_bad_retention_is_a_user_error(fleet: Fleet, raw: float, step: float, rollups: float) -> None:
    with pytest.raises(UserInputError):
        compact(fleet.db, T0, raw_retention_s=raw, rollup_step_s=step, rollup_retention_s=rollups)


# -- rollouts ---------------------------------------------------------------------------------


def test_rollout_latency_compares_the_replaced_version_before_commit_with_the_new_one_after(
    workspace: Workspace, fleet: Fleet,
) -> None:
    rollout_id = start_all_at_once(workspace, "cam-1", "cam-2")
    with workspace.db.reading() as session:
        deployments = {d.device_id: d.id for d in session.scalars(select(Deployment)
                                                                   .where(Deployment.rollout_id == rollout_id))}
    cam1, cam2 = fleet.cams[:2]
    commit = T0 + 600
    rng = np.random.default_rng(5)
    old = {cam: rng.lognormal(1.0, 0.2, size=40).tolist() for cam in (cam1, cam2)}
    new = rng.lognormal(1.5, 0.2, size=40).tolist()
    messages = [serving(cam, 1, old[cam], end=commit - 100, model="legacy", version=4) for cam in (cam1, cam2)]
    messages.append(serving(cam1, 2, [99.0], end=commit - 2 * 3600, model="legacy", version=4))  # outside window
    messages.append(serving(cam1, 3, new, end=commit + 100, deployment_id=deployments[cam1]))
    ingest(workspace.db, *messages)
    with workspace.db.session() as session:
        apply_event(session, Event(v=PROTOCOL_VERSION, device_id=cam1, boot_id="boot-1", seq=1,
                                   deployment_id=deployments[cam1], state=UpdateState.COMMITTED.value, reason="",
                                   ts=commit))

    result = rollout_latency(workspace.db, rollout_id)
    one, two = result.by_device["cam-1"], result.by_device["cam-2"]
    assert one.before is not None and one.after is not None and one.ratio_p95 is not None
    assert one.before.calls == 40 and one.after.calls == 40
    assert _within_one_bucket(one.before.p95_ms, float(np.percentile(old[cam1], 95)))
    assert _within_one_bucket(one.after.p95_ms, float(np.percentile(new, 95)))
    assert one.ratio_p95 == pytest.approx(one.after.p95_ms / one.before.p95_ms)
    assert two.after is None and two.ratio_p95 is None  # not committed yet
    profile = result.by_profile["x86-64"]
    assert profile.after is not None and profile.after.calls == 40
    assert profile.before is not None and profile.before.calls == 40  # cam-2's 'before' ends at its directive
    document = rollout_latency_json(result)
    assert document["rollout_id"] == rollout_id
    assert document["by_device"]["cam-1"]["after"]["calls"] == 40
    assert document["by_device"]["cam-2"]["after"] is None
