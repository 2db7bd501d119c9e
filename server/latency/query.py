"""The one read model of served-model latency: what ``edgefleet latency``, ``edgefleet top``, the HTTP API and
the dashboard show.

Every number comes from merging serving reports' bucket counts
(``server/latency/stats.py``); a percentile is never averaged. Reports are
read from the raw table and the rollup table in one read transaction:
retention moves a report from one to the other in a single transaction, so
a query that spans the boundary counts each report exactly once. A rollup
row stands for the reports whose interval ended in its bucket and is placed
at the bucket's start.

A series step holds the reports whose interval *ended* in [start, end), the
steps laid from ``since``; only steps with data are returned.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from server.db import Database, Session, latency_queries, queries
from server.db.latency_queries import ServingSlice
from server.db.models import Deployment, Profile, Release
from server.devices import find_device
from server.latency.stats import Accumulator, LatencyStats, stats_json
from server.rollouts.states import DeploymentKind, DeploymentState
from shared.errors import NotFoundError, UserInputError
from shared.histogram import LatencyHistogram

__all__ = [
    "MAX_POINTS", "BeforeAfter", "DeviceLatencySummary", "LatencyPoint", "LatencySeries", "LatencyStats",
    "LatencyTotal", "ModelChange", "RolloutLatency", "VersionLatency", "check_range", "device_latency",
    "latency_summary", "latency_totals", "model_latency", "profile_latency", "rollout_latency",
    "rollout_latency_json", "series_json", "summary_json",
]

MAX_POINTS = 10_000


@dataclass(frozen=True)
class LatencyPoint:
    """One step of a series: reports whose interval END falls in [start, end)."""

    start: float
    end: float
    stats: LatencyStats
    sources: tuple[str, ...]  # "traffic" and/or "rebenchmark"


@dataclass(frozen=True)
class ModelChange:
    """When a device's served model version changed (device series only)."""

    ts: float
    device: str
    model: str
    version: int
    previous_version: int | None


@dataclass(frozen=True)
class VersionLatency:
    """The whole range, per model version."""

    model: str
    version: int
    stats: LatencyStats


@dataclass(frozen=True)
class LatencySeries:
    scope: str  # "device" | "profile" | "model"
    name: str  # device name, profile name, or "model:version"
    since: float
    until: float
    step_s: float
    points: tuple[LatencyPoint, ...]
    versions: tuple[VersionLatency, ...]
    changes: tuple[ModelChange, ...]


@dataclass(frozen=True)
class DeviceLatencySummary:
    device_id: str
    device: str
    profile: str
    model: str | None
    version: int | None
    window_s: float
    calls_per_s: float
    stats: LatencyStats
    last_report: float | None


@dataclass(frozen=True)
class BeforeAfter:
    before: LatencyStats | None  # the replaced version on the same device(s), reports ending before the commit
    after: LatencyStats | None  # the rollout's version, reports after the commit
    ratio_p95: float | None  # after.p95 / before.p95


@dataclass(frozen=True)
class RolloutLatency:
    rollout_id: str
    by_profile: dict[str, BeforeAfter]
    by_device: dict[str, BeforeAfter]  # by device name


@dataclass(frozen=True)
class LatencyTotal:
    """Cumulative since the database was created, monotonic (for Prometheus)."""

    profile: str
    model: str
    version: int
    calls: int
    errors: int
    histogram: LatencyHistogram  # invoke times


# -- ranges ---------------------------------------------------------------------------


def check_range(since: float, until: float, step_s: float) -> None:
    """Raise UserInputError (HTTP 400) unless since < until, step > 0 and the range has at most MAX_POINTS steps."""
    if not all(math.isfinite(x) for x in (since, until, step_s)):
        raise UserInputError("since, until and step must be finite numbers")
    if since >= until:
        raise UserInputError(f"since ({since:g}) must be before until ({until:g})")
    if step_s <= 0:
        raise UserInputError(f"step must be more than zero seconds, got {step_s:g}")
    if (until - since) / step_s > MAX_POINTS:
        raise UserInputError(f"{until - since:g} s in steps of {step_s:g} s is more than {MAX_POINTS} points: "
                             "choose a larger step or a shorter range")


# -- series ----------------------------------------------------------------------------


def _series(scope: str, name: str, since: float, until: float, step_s: float, slices: Iterable[ServingSlice],
            changes: tuple[ModelChange, ...] = ()) -> LatencySeries:
    steps: dict[int, Accumulator] = defaultdict(Accumulator)
    versions: dict[tuple[str, int], Accumulator] = defaultdict(Accumulator)
    for s in slices:
        index = int((s.end_ts - since) // step_s)
        for acc in (steps[index], versions[(s.model, s.version)]):
            acc.add_report(s.calls, s.errors, s.samples, s.invoke, s.e2e, s.source)
    points = []
    for index in sorted(steps):
        start = since + index * step_s
        acc = steps[index]
        points.append(LatencyPoint(start, min(start + step_s, until), acc.stats(), tuple(sorted(acc.sources))))
    return LatencySeries(
        scope=scope, name=name, since=since, until=until, step_s=step_s, points=tuple(points),
        versions=tuple(VersionLatency(m, v, versions[(m, v)].stats()) for m, v in sorted(versions)),
        changes=changes,
    )


def _model_changes(session: Session, device_id: str, device: str, since: float,
                   slices: Iterable[ServingSlice]) -> tuple[ModelChange, ...]:
    """Where consecutive reports of the device name a different (model, version) than the one before."""
    previous = latency_queries.last_model_before(session, device_id, since)
    changes = []
    for s in slices:
        current = (s.model, s.version)
        if previous is not None and current != previous:
            changes.append(ModelChange(ts=float(s.start_ts), device=device, model=s.model, version=s.version,
                                       previous_version=previous[1]))
        previous = current
    return tuple(changes)


def device_latency(db: Database, name: str, *, since: float, until: float, step_s: float) -> LatencySeries:
    """The device's latency per step; NotFoundError if no live device has this name."""
    check_range(since, until, step_s)
    with db.reading() as session:
        device = find_device(session, name)
        slices = latency_queries.serving_slices(session, since=since, until=until, device_ids=[device.id])
        changes = _model_changes(session, device.id, device.name, since, slices)
        return _series("device", device.name, since, until, step_s, slices, changes)


def _find_profile(session: Session, profile: str) -> None:
    if session.get(Profile, profile) is None:
        raise NotFoundError(f"unknown profile {profile!r}; 'edgefleet profile list' shows them")


def _find_model(session: Session, model: str, version: int | None) -> None:
    found = queries.model_by_name(session, model)
    if found is None:
        raise NotFoundError(f"unknown model {model!r}; 'edgefleet model list' shows them")
    if version is not None and queries.model_version(session, found, version) is None:
        raise NotFoundError(f"model {model!r} has no version {version}; 'edgefleet model list' shows them")


def profile_latency(db: Database, profile: str, *, since: float, until: float, step_s: float,
                    model: str | None = None, version: int | None = None) -> LatencySeries:
    """Every device of the profile merged, optionally one model (version); NotFoundError if unknown."""
    check_range(since, until, step_s)
    with db.reading() as session:
        _find_profile(session, profile)
        if model is not None:
            _find_model(session, model, version)
        slices = latency_queries.serving_slices(session, since=since, until=until, profile=profile, model=model,
                                                version=version)
        return _series("profile", profile, since, until, step_s, slices)


def model_latency(db: Database, model: str, version: int, *, since: float, until: float, step_s: float,
                  profile: str | None = None) -> LatencySeries:
    """One model version on every device (or one profile's); NotFoundError if unknown."""
    check_range(since, until, step_s)
    with db.reading() as session:
        _find_model(session, model, version)
        if profile is not None:
            _find_profile(session, profile)
        slices = latency_queries.serving_slices(session, since=since, until=until, profile=profile, model=model,
                                                version=version)
        return _series("model", f"{model}:{version}", since, until, step_s, slices)


# -- fleet summary ----------------------------------------------------------------------


def latency_summary(db: Database, *, window_s: float = 300.0, now: float | None = None) -> dict[str, DeviceLatencySummary]:
    """Each live device's latency over the last ``window_s`` seconds, by device id."""
    if not (math.isfinite(window_s) and window_s > 0):
        raise UserInputError(f"the window must be more than zero seconds, got {window_s:g}")
    now = time.time() if now is None else now
    with db.reading() as session:
        slices = latency_queries.serving_slices(session, since=now - window_s, until=math.nextafter(now, math.inf))
        last = latency_queries.last_report_times(session)
        per_device: dict[str, Accumulator] = defaultdict(Accumulator)
        newest: dict[str, ServingSlice] = {}
        for s in slices:
            per_device[s.device_id].add_report(s.calls, s.errors, s.samples, s.invoke, s.e2e, s.source)
            newest[s.device_id] = s
        result = {}
        for device in queries.devices(session):
            acc = per_device.get(device.id, Accumulator())
            recent = newest.get(device.id)
            model = device.active_model or (recent.model if recent else None)
            version = device.active_version if device.active_model else (recent.version if recent else None)
            result[device.id] = DeviceLatencySummary(
                device_id=device.id, device=device.name, profile=device.profile_name, model=model, version=version,
                window_s=window_s, calls_per_s=acc.calls / window_s, stats=acc.stats(), last_report=last.get(device.id),
            )
        return result


# -- rollouts ----------------------------------------------------------------------------


def _release_model(release: Release | None) -> tuple[str, int] | None:
    if release is None:
        return None
    version = release.artifact.model_version
    return version.model.name, version.version


def _latest_installs(deployments: Iterable[Deployment]) -> list[Deployment]:
    latest: dict[str, Deployment] = {}
    for deployment in deployments:
        if deployment.kind != DeploymentKind.INSTALL.value:
            continue
        if deployment.device_id not in latest or deployment.seq > latest[deployment.device_id].seq:
            latest[deployment.device_id] = deployment
    return list(latest.values())


def _before_after(before: Accumulator | None, after: Accumulator | None) -> BeforeAfter:
    b = before.stats() if before is not None else None
    a = after.stats() if after is not None else None
    ratio = a.p95_ms / b.p95_ms if a and b and a.p95_ms is not None and b.p95_ms else None
    return BeforeAfter(before=b, after=a, ratio_p95=ratio)


def _merge(slices: Iterable[ServingSlice]) -> Accumulator | None:
    acc, any_report = Accumulator(), False
    for s in slices:
        acc.add_report(s.calls, s.errors, s.samples, s.invoke, s.e2e, s.source)
        any_report = True
    return acc if any_report else None


def rollout_latency(db: Database, rollout_id: str, *, window_s: float = 3600.0) -> RolloutLatency:
    """Per device of the rollout and per profile: the replaced version's latency in the ``window_s`` before the
    device committed, and the rollout's version in the ``window_s`` after. A device that has not committed has
    'before' up to when it was sent the rollout and no 'after'. NotFoundError if the rollout is unknown."""
    if not (math.isfinite(window_s) and window_s > 0):
        raise UserInputError(f"the window must be more than zero seconds, got {window_s:g}")
    with db.reading() as session:
        rollout = queries.rollout(session, rollout_id)
        if rollout is None:
            raise NotFoundError(f"unknown rollout {rollout_id!r}; 'edgefleet rollout list' shows them")
        target = (rollout.model_version.model.name, rollout.model_version.version)
        installs = _latest_installs(rollout.deployments)
        committed_at = latency_queries.committed_event_times(session, [d.id for d in installs])
        by_device: dict[str, BeforeAfter] = {}
        profile_parts: dict[str, tuple[list[Accumulator], list[Accumulator]]] = defaultdict(lambda: ([], []))
        for deployment in sorted(installs, key=lambda d: d.device.name):
            committed = deployment.state == DeploymentState.COMMITTED.value
            if committed:
                ref = committed_at.get(deployment.id, deployment.updated_at.timestamp())
            else:
                ref = (deployment.published_at or deployment.created_at).timestamp()
            around = latency_queries.serving_slices(session, since=ref - window_s, until=ref + window_s,
                                                    device_ids=[deployment.device_id])
            earlier = [s for s in around if s.end_ts < ref]
            replaced = _release_model(deployment.previous_release)
            before_slices = [s for s in earlier if (s.model, s.version) == replaced]
            if not before_slices:  # the replaced release unknown or silent: any other version it served
                before_slices = [s for s in earlier if (s.model, s.version) != target]
            before = _merge(before_slices)
            after = _merge(s for s in around if s.end_ts >= ref and (s.model, s.version) == target) if committed else None
            by_device[deployment.device.name] = _before_after(before, after)
            parts = profile_parts[deployment.device.profile_name]
            if before is not None:
                parts[0].append(before)
            if after is not None:
                parts[1].append(after)
        by_profile = {
            profile: _before_after(Accumulator.merged(b) if b else None, Accumulator.merged(a) if a else None)
            for profile, (b, a) in sorted(profile_parts.items())
        }
        return RolloutLatency(rollout_id=rollout.id, by_profile=by_profile, by_device=by_device)


# -- totals --------------------------------------------------------------------------------


def latency_totals(db: Database) -> list[LatencyTotal]:
    """Cumulative calls, errors and invoke histogram per (profile, model, version); never reduced by retention."""
    with db.reading() as session:
        return [LatencyTotal(t.profile, t.model, t.version, int(t.calls), int(t.errors),
                             LatencyHistogram.from_json(t.invoke))
                for t in latency_queries.serving_totals(session)]


# -- JSON ----------------------------------------------------------------------------------


def series_json(series: LatencySeries) -> dict[str, Any]:
    """What ``edgefleet latency --json`` prints and the HTTP API returns for a series."""
    return {
        "scope": series.scope,
        "name": series.name,
        "since": series.since,
        "until": series.until,
        "step_s": series.step_s,
        "points": [{"start": p.start, "end": p.end, **stats_json(p.stats), "sources": list(p.sources)}
                   for p in series.points],
        "versions": [{"model": v.model, "version": v.version, **stats_json(v.stats)} for v in series.versions],
        "changes": [asdict(c) for c in series.changes],
    }


def _device_summary_json(summary: DeviceLatencySummary) -> dict[str, Any]:
    return {
        "device_id": summary.device_id, "device": summary.device, "profile": summary.profile,
        "model": summary.model, "version": summary.version, "window_s": summary.window_s,
        "calls_per_s": summary.calls_per_s, **stats_json(summary.stats), "last_report": summary.last_report,
    }


def summary_json(summary: DeviceLatencySummary | Mapping[str, DeviceLatencySummary]) -> dict[str, Any]:
    """One device's summary as JSON; given ``latency_summary``'s whole mapping, {device id: that JSON}."""
    if isinstance(summary, DeviceLatencySummary):
        return _device_summary_json(summary)
    return {device_id: _device_summary_json(s) for device_id, s in summary.items()}


def _before_after_json(value: BeforeAfter) -> dict[str, Any]:
    return {
        "before": stats_json(value.before) if value.before is not None else None,
        "after": stats_json(value.after) if value.after is not None else None,
        "ratio_p95": value.ratio_p95,
    }


def rollout_latency_json(r: RolloutLatency) -> dict[str, Any]:
    return {
        "rollout_id": r.rollout_id,
        "by_profile": {profile: _before_after_json(v) for profile, v in r.by_profile.items()},
        "by_device": {device: _before_after_json(v) for device, v in r.by_device.items()},
    }
