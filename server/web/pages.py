"""The dashboard's pages: HTML shells that ``/static/dashboard.js`` fills from the JSON API and keeps
up to date by polling it (no reload). Nothing here comes from a CDN: uPlot is vendored under
``/static/vendor/uplot/``. An unknown device, rollout or model is a 404 page. With auth on, the header
names the caller's token and has a "Log out" button (``server.web.login``)."""

from __future__ import annotations

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from server.api_tokens import Scope
from server.catalog import resolve_version
from server.db import Database, queries
from server.devices import find_device
from server.web.auth import caller
from shared.errors import NotFoundError

router = APIRouter(include_in_schema=False)


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _page(request: Request, page: str, title: str, body: str, **data: str) -> HTMLResponse:
    principal = caller(request)
    # /metrics is for metrics and operator tokens: a read token's page does not link to a 403
    metrics = "" if principal is not None and principal.scope is Scope.READ else '<a href="/metrics">Metrics</a>'
    session = "" if principal is None else (
        f'<form method="post" action="/logout" class="session"><span class="muted">{html.escape(principal.name)}'
        '</span><button type="submit">Log out</button></form>')
    attrs = " ".join(f'data-{k.replace("_", "-")}="{html.escape(v, quote=True)}"' for k, v in data.items())
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · edgefleet</title>
<link rel="stylesheet" href="/static/vendor/uplot/uPlot.min.css">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/dashboard.css">
</head><body data-page="{page}" {attrs}>
<header class="top"><a href="/" class="brand">edgefleet</a><nav><a href="/">Fleet</a><a href="/docs">API</a>
{metrics}</nav><span id="status" class="status">loading…</span>{session}</header>
<main>{body}</main>
<script src="/static/vendor/uplot/uPlot.iife.min.js"></script>
<script src="/static/dashboard.js"></script>
</body></html>""")


@router.get("/", response_class=HTMLResponse)
def fleet_page(request: Request) -> HTMLResponse:
    return _page(request, "fleet", "Fleet", """
<h1>Fleet</h1>
<section><h2>Profiles</h2><div id="profiles" class="cards"></div></section>
<section><h2>Devices</h2><table id="devices" class="grid"><thead><tr><th>Device</th><th>Profile</th><th>Status</th>
<th>Model</th><th>Variant</th><th class="num">Calls/s</th><th class="num">p50 ms</th><th class="num">p95 ms</th>
<th>Last report</th></tr></thead><tbody></tbody></table></section>
<section><h2>Rollouts</h2><table id="rollouts" class="grid"><thead><tr><th>Rollout</th><th>Model</th><th>State</th>
<th>Waves</th><th class="num">Devices</th><th class="num">Committed</th><th class="num">Failed</th><th>Created</th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Models</h2><table id="models" class="grid"><thead><tr><th>Model</th><th>Version</th><th>Created</th>
<th class="num">Reference accuracy</th><th>Builds</th></tr></thead><tbody></tbody></table></section>""")


@router.get("/devices/{name}", response_class=HTMLResponse)
def device_page(name: str, request: Request) -> HTMLResponse:
    with _db(request).reading() as session:
        find_device(session, name)  # NotFoundError: the 404 page
    return _page(request, "device", name, """
<h1 id="title"></h1><p id="subtitle" class="muted"></p>
<div id="tiles" class="tiles"></div>
<section><div class="section-head"><h2>On-device latency</h2><div id="ranges" class="ranges"></div></div>
<div id="latency-chart" class="chart"></div><div id="calls-chart" class="chart small"></div>
<p class="muted legend">Each dashed line marks a change of the served model version.</p></section>
<section><h2>Per model version</h2><table id="versions" class="grid"><thead><tr><th>Model</th>
<th class="num">Calls</th><th class="num">Errors</th><th class="num">p50 ms</th><th class="num">p90 ms</th>
<th class="num">p95 ms</th><th class="num">p99 ms</th><th class="num">Mean ms</th></tr></thead><tbody></tbody></table></section>
<section><h2>Recent deployments</h2><table id="deployments" class="grid"><thead><tr><th>Deployment</th><th>Rollout</th>
<th>Model</th><th>Kind</th><th>Wave</th><th>State</th><th class="num">p50 ms</th><th class="num">p95 ms</th>
<th class="num">Accuracy</th><th>Updated</th><th>Reason</th></tr></thead><tbody></tbody></table></section>""",
                 device=name)


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(rollout_id: str, request: Request) -> HTMLResponse:
    with _db(request).reading() as session:
        if queries.rollout(session, rollout_id) is None:
            raise NotFoundError(f"unknown rollout {rollout_id!r}")
    return _page(request, "rollout", rollout_id, """
<h1 id="title"></h1><p id="subtitle" class="muted"></p>
<section><h2>Waves</h2><div id="waves" class="waves"></div></section>
<section><h2>Latency before and after, per profile</h2><table id="before-after" class="grid"><thead><tr>
<th>Profile</th><th class="num">Calls before</th><th class="num">p50 before</th><th class="num">p95 before</th>
<th class="num">Calls after</th><th class="num">p50 after</th><th class="num">p95 after</th><th class="num">p95 after/before</th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Devices</h2><table id="rollout-devices" class="grid"><thead><tr><th>Device</th><th>Profile</th><th>Wave</th>
<th>State</th><th>Recipe</th><th class="num">Trial p95 ms</th><th class="num">Replaced p95 ms</th>
<th class="num">Accuracy</th><th class="num">Serving p95 before</th><th class="num">Serving p95 after</th><th>Reason</th>
</tr></thead><tbody></tbody></table></section>""", rollout=rollout_id)


@router.get("/models/{name}/{version}", response_class=HTMLResponse)
def model_page(name: str, version: int, request: Request) -> HTMLResponse:
    with _db(request).reading() as session:
        resolve_version(session, f"{name}:{version}")
    return _page(request, "model", f"{name}:{version}", """
<h1 id="title"></h1><p id="subtitle" class="muted"></p><div id="reports"></div>""",
                 model=name, version=str(version))
