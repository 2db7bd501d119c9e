"""The dashboard's login: a token form that sets the session cookie, and logging out.

``POST /login`` takes ``token`` (and ``next``, a path on this server) as a form, checks the token like
any request (``server.api_tokens.TokenVerifier``), and answers with a redirect that sets the cookie
``server.web.auth`` reads: HttpOnly (no script reads it), SameSite=Strict (no other site's request
carries it), Secure when served over TLS, for ``COOKIE_MAX_AGE_S``. A ``metrics`` token cannot log in:
it may read ``/metrics`` only. A refused token gets the form again with the reason (200: a 401 would need
a ``WWW-Authenticate`` challenge the form is not). A form posted from another origin is refused (no login
forgery).
"""

from __future__ import annotations

import html
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from server.api_tokens import Principal, Scope, TokenVerifier
from server.web.auth import COOKIE, COOKIE_MAX_AGE_S, LOGIN_PATH
from server.web.bodies import capped_body
from server.web.problems import error_page

router = APIRouter(include_in_schema=False)

MAX_FORM_BYTES = 4096


def safe_next(value: str | None) -> str:
    """A path on this server to go to after the login; anything else (another host, ``//evil``) is ``/``."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def login_page(next_path: str, error: str = "", status: int = 200) -> HTMLResponse:
    message = f'<p id="login-error" class="login-error">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · edgefleet</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/static/dashboard.css">
</head><body data-page="login"><header class="top"><span class="brand">edgefleet</span></header>
<main class="login"><h1>Log in</h1>
<p class="muted">This server needs an API token with the read or operator scope
(<code>edgefleet token create NAME --scope read</code>; <code>edgefleet init</code> wrote an operator token to
<code>DATA_DIR/api-token</code>).</p>{message}
<form method="post" action="{LOGIN_PATH}" class="login-form">
<input type="hidden" name="next" value="{html.escape(next_path, quote=True)}">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Log in</button>
</form></main></body></html>""", status_code=status, headers={"Cache-Control": "no-store"})


def _same_origin(request: Request) -> bool:
    """A browser says where a form came from (``Origin``); a form from another origin is refused.
    No ``Origin`` (a script, an old browser) is allowed: it carries no cookie of ours to abuse."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


@router.get(LOGIN_PATH, response_class=HTMLResponse)
def login_form(request: Request, next_path: Annotated[str | None, Query(alias="next")] = None) -> Response:
    if not request.app.state.auth_required:
        return RedirectResponse(safe_next(next_path), status_code=303)
    return login_page(safe_next(next_path))


@router.post(LOGIN_PATH, response_class=HTMLResponse)
async def login(request: Request) -> Response:
    if not _same_origin(request):
        return error_page(403, "a login form from another site is refused")
    body = await capped_body(request, MAX_FORM_BYTES)  # the form is small
    if body is None:
        return login_page("/", "the form is too large", status=413)
    try:
        fields = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=8)
    except ValueError:  # more fields than a login form has
        return login_page("/", "not a login form", status=400)
    next_path = safe_next((fields.get("next") or ["/"])[0])
    token = (fields.get("token") or [""])[0].strip()
    verifier: TokenVerifier = request.app.state.tokens
    principal: Principal | None = await run_in_threadpool(verifier.verify, token) if token else None
    if principal is None:
        return login_page(next_path, "That token is not valid: unknown, rotated or revoked.")
    if principal.scope is Scope.METRICS:
        return login_page(next_path, f"Token {principal.name} has the metrics scope: it may read /metrics only, "
                          "not the dashboard.")
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE_S, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if not _same_origin(request):
        return error_page(403, "a logout form from another site is refused")
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response
