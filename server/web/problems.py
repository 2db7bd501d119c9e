"""Errors as RFC 9457 problem details (``application/problem+json``) with a stable ``type``.

Every error the API answers goes through here: the edgefleet error tree (``NotFoundError`` → 404,
``UserInputError`` → 400, any other ``EdgefleetError``, e.g. the database refusing → 503), FastAPI's
request validation (a query or path parameter of the wrong type → 400, not FastAPI's 422), and
Starlette's own HTTP errors (an unknown path → 404). A page (not ``/api/``) that is not found gets
an HTML page instead.
"""

from __future__ import annotations

import html
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import AccessDeniedError, EdgefleetError, NotFoundError, UserInputError

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:edgefleet:problem:"
NOT_FOUND = TYPE_PREFIX + "not-found"
BAD_REQUEST = TYPE_PREFIX + "bad-request"
UNAVAILABLE = TYPE_PREFIX + "unavailable"
UNAUTHORIZED = TYPE_PREFIX + "unauthorized"  # no token, or one that is not valid (unknown, rotated, revoked)
FORBIDDEN = TYPE_PREFIX + "forbidden"  # a valid token whose scope does not allow the route
CONFLICT = TYPE_PREFIX + "conflict"  # a change the resource's current state does not allow
HTTP_ERROR = "about:blank"  # RFC 9457: the status code says it all


def problem(status: int, type_: str, detail: str, title: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "title": title or HTTPStatus(status).phrase, "status": status,
                            "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def error_page(status: int, detail: str) -> HTMLResponse:
    """The dashboard's error page (404, 403): plain, with the reason and a way back."""
    title = html.escape(HTTPStatus(status).phrase.capitalize())  # "Not found", "Forbidden"
    body = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title} · edgefleet</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/dashboard.css"></head><body><header class="top"><a href="/" class="brand">edgefleet</a>
</header><main><h1>{title}</h1><p class="muted">{html.escape(detail)}</p><p><a href="/">Back to the fleet</a></p>
</main></body></html>"""
    return HTMLResponse(body, status_code=status)


def not_found_page(detail: str) -> HTMLResponse:
    return error_page(404, detail)


def wants_page(request: Request) -> bool:
    """Whether the path is the dashboard's (an HTML answer), not the API's, /metrics' or /openapi.json's."""
    path = request.url.path
    return not (path.startswith("/api/") or path in ("/metrics", "/openapi.json", "/healthz"))


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotFoundError)
    async def on_not_found(request: Request, exc: NotFoundError) -> Response:
        if wants_page(request):
            return not_found_page(str(exc))
        return problem(404, NOT_FOUND, str(exc))

    @app.exception_handler(AccessDeniedError)
    async def on_access_denied(request: Request, exc: AccessDeniedError) -> Response:
        logger.warning("%s %s refused: %s", request.method, request.url.path, exc)
        return problem(403, FORBIDDEN, str(exc))

    @app.exception_handler(UserInputError)
    async def on_user_input(request: Request, exc: UserInputError) -> Response:
        return problem(400, BAD_REQUEST, str(exc))

    @app.exception_handler(EdgefleetError)
    async def on_edgefleet_error(request: Request, exc: EdgefleetError) -> Response:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return problem(503, UNAVAILABLE, str(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return problem(400, BAD_REQUEST, _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            if wants_page(request):
                return not_found_page(f"there is no page at {request.url.path}")
            return problem(404, NOT_FOUND, f"no such resource {request.url.path}")
        return problem(exc.status_code, HTTP_ERROR, str(exc.detail))
