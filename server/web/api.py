"""``/api/v1``: the JSON API's read routes. Each route parses its parameters and calls the read model the
CLI's ``--json`` prints from; errors become problem details (``server.web.problems``). The write routes
are in ``server.web.actions``; who may call which is ``server.web.auth``'s."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.security import HTTPBearer

from server import latency
from server.db import Database
from server.device_read_model import deployment_json, device_detail, device_json
from server.devices import list_devices
from server.model_read_model import models_json, reports_json
from server.rollouts import rollout_status
from server.rollouts.read_model import entry_json, list_events, list_rollouts, status_json, summary_json
from server.web.timerange import TimeRange, parse_since, time_range

# the bearer scheme documents the Authorization header in the OpenAPI schema; server.web.auth checks it
router = APIRouter(prefix="/api/v1", tags=["api"], dependencies=[Security(HTTPBearer(auto_error=False))])

SUMMARY_WINDOW_S = 300.0  # the "now" numbers of a device: its reports of the last five minutes

Json = dict[str, Any]
SinceQuery = Annotated[str | None, Query(description="epoch seconds, or a duration ago like '1h' (default: now-1h)")]
UntilQuery = Annotated[str | None, Query(description="epoch seconds, or a duration ago like '5m' (default: now)")]
StepQuery = Annotated[str | None, Query(description="seconds, or a duration like '1m' (default: at most ~120 points)")]


def database(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def clock(request: Request) -> float:
    now: float = request.app.state.clock()
    return now


DB = Annotated[Database, Depends(database)]
Now = Annotated[float, Depends(clock)]


def _range(now: float, since: str | None, until: str | None, step: str | None) -> TimeRange:
    return time_range(now, since=since, until=until, step=step)


@router.get("/devices", summary="Every live device with its latency of the last five minutes")
def devices(db: DB, now: Now) -> list[Json]:
    summaries = latency.latency_summary(db, window_s=SUMMARY_WINDOW_S, now=now)
    return [
        {**device_json(row), "latency": latency.summary_json(summaries[row.id]) if row.id in summaries else None}
        for row in list_devices(db)
    ]


@router.get("/devices/{name}", summary="One device, its latency of the last five minutes, its recent deployments")
def device(name: str, db: DB, now: Now) -> Json:
    detail = device_detail(db, name)
    summary = latency.latency_summary(db, window_s=SUMMARY_WINDOW_S, now=now).get(detail.device.id)
    return {
        "device": device_json(detail.device),
        "latency": latency.summary_json(summary) if summary is not None else None,
        "deployments": [deployment_json(d) for d in detail.deployments],
    }


@router.get("/devices/{name}/latency", summary="A device's latency over time (p50/p90/p99 and calls per step)")
def device_latency(name: str, db: DB, now: Now, since: SinceQuery = None, until: UntilQuery = None,
                   step: StepQuery = None) -> Json:
    r = _range(now, since, until, step)
    return latency.series_json(latency.device_latency(db, name, since=r.since, until=r.until, step_s=r.step_s))


@router.get("/profiles/{name}/latency", summary="A device profile's latency over time, optionally of one model version")
def profile_latency(
    name: str, db: DB, now: Now, since: SinceQuery = None, until: UntilQuery = None, step: StepQuery = None,
    model: Annotated[str | None, Query(description="only this model")] = None,
    version: Annotated[int | None, Query(description="only this version of the model", ge=1)] = None,
) -> Json:
    r = _range(now, since, until, step)
    return latency.series_json(latency.profile_latency(db, name, since=r.since, until=r.until, step_s=r.step_s,
                                                       model=model, version=version))


@router.get("/models", summary="Every model with its versions and what each profile ships")
def models(db: DB) -> list[Json]:
    return models_json(db)


@router.get("/models/{name}/{version}/report", summary="The compression report of a model version, per profile")
def model_report(name: str, version: int, db: DB) -> list[Json]:
    return reports_json(db, f"{name}:{version}")


@router.get("/rollouts", summary="Recent rollouts, newest first")
def rollouts(db: DB, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[Json]:
    return [summary_json(r) for r in list_rollouts(db, limit)]


@router.get("/rollouts/{rollout_id}", summary="A rollout: waves and gates, devices, before/after latency")
def rollout(rollout_id: str, db: DB) -> Json:
    status = status_json(rollout_status(db, rollout_id))
    return {**status, "latency": latency.rollout_latency_json(latency.rollout_latency(db, rollout_id))}


@router.get("/events", summary="The audit log, oldest first (the newest `limit`)")
def events(
    db: DB, now: Now, since: SinceQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    rollout: Annotated[str | None, Query(description="only this rollout's events")] = None,
    device: Annotated[str | None, Query(description="only this device's events")] = None,
) -> list[Json]:
    entries = list_events(db, rollout_id=rollout, device_name=device, limit=limit,
                          since=parse_since(now, since) if since is not None else None)
    return [entry_json(e) for e in entries]
