"""The HTTP application: JSON API, dashboard pages, ``/metrics``, OpenAPI at ``/openapi.json`` and ``/docs``.

``create_app(db)`` builds it; ``server.web.server.WebServer`` runs it. The read routes read the registry
in short sessions through the same read models as the CLI's ``--json``; the write routes
(``server.web.actions``) call the same services as the CLI. ``server.web.auth`` checks every request
first: with ``auth_required`` every route but ``/healthz``, the login page and the static files needs a
token; without it only the write routes do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from server.api_tokens import TokenVerifier
from server.db import Database
from server.enrolment import Enrolment
from server.web import actions, api, enrol, login, metrics, pages
from server.web.auth import AuthMiddleware
from server.web.problems import install_problem_handlers

STATIC_DIR = Path(__file__).parent / "static"


def create_app(db: Database, *, clock: Callable[[], float] = time.time, auth_required: bool = False,
               enrolment: Enrolment | None = None) -> FastAPI:
    """``enrolment``: serve ``/enrol`` for ``edgefleet agent enrol`` (a server with a data directory's broker)."""
    app = FastAPI(
        title="edgefleet",
        summary="API of an edgefleet server: devices, on-device latency, models, rollouts, events; "
                "operator actions on rollouts.",
        version="1",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.db = db
    app.state.clock = clock
    app.state.enrolment = enrolment
    app.state.metrics = metrics.fleet_registry(db)
    app.state.auth_required = auth_required
    app.state.tokens = TokenVerifier(db, clock)
    install_problem_handlers(app)
    app.add_middleware(AuthMiddleware, verifier=app.state.tokens, required=auth_required)
    app.include_router(api.router)
    app.include_router(actions.router)
    app.include_router(metrics.router)
    app.include_router(login.router)
    app.include_router(enrol.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", tags=["health"], summary="The server answers (open, even with auth on)")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app
