"""Who may call what over HTTP: bearer tokens (``server.api_tokens``) checked on every request.

Default deny: ``access_of`` puts every request in one class, and only the ``OPEN`` ones pass unchecked.

============  ===========================================  ==================  =========================
class         requests                                     scopes              when auth is off
============  ===========================================  ==================  =========================
``OPEN``      ``/healthz``, ``/login``, ``/logout``,        anyone              anyone
              ``/static/…``, ``/enrol`` (its token),
              ``/enrol/ca.pem``
``METRICS``   ``/metrics``                                 metrics, operator   anyone
``READ``      any other ``GET``/``HEAD``/``OPTIONS``:       read, operator      anyone
              pages, ``/api/v1``, ``/openapi.json``,
              ``/docs``
``WRITE``     any other method (``POST /api/v1/…``)        operator            operator (never open)
============  ===========================================  ==================  =========================

Auth is on whenever the server listens beyond loopback (``auth_required``), or when ``--auth`` asks.
A token comes as ``Authorization: Bearer <token>``, or, for a browser, in the HttpOnly, SameSite=Strict
cookie the login page sets; the cookie never authorises a write (no cross-site request forgery, even
from a browser that ignores SameSite). A page request without a token is sent to the login page; any
other refusal is problem+json: 401 with ``WWW-Authenticate: Bearer`` (no token, or one that is unknown,
rotated or revoked), 403 for a scope that does not allow the route. Tokens are never logged.
"""

from __future__ import annotations

import enum
import ipaddress
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api_tokens import Principal, TokenVerifier
from server.api_tokens import Scope as TokenScope
from server.web.problems import FORBIDDEN, UNAUTHORIZED, error_page, problem, wants_page
from shared.enrolment import CA_PATH, ENROL_PATH
from shared.errors import UserInputError

COOKIE = "edgefleet_token"
COOKIE_MAX_AGE_S = 12 * 3600  # a browser login lasts a working day
LOGIN_PATH = "/login"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# enrolment carries its own credential, the one-time token (server/web/enrol.py)
OPEN_PATHS = frozenset({"/healthz", LOGIN_PATH, "/logout", ENROL_PATH, CA_PATH})


class Access(enum.Enum):
    OPEN = "open"
    METRICS = "metrics"
    READ = "read"
    WRITE = "write"


ALLOWED: dict[Access, frozenset[TokenScope]] = {
    Access.METRICS: frozenset({TokenScope.METRICS, TokenScope.OPERATOR}),
    Access.READ: frozenset({TokenScope.READ, TokenScope.OPERATOR}),
    Access.WRITE: frozenset({TokenScope.OPERATOR}),
}


def access_of(method: str, path: str) -> Access:
    if path in OPEN_PATHS or path.startswith("/static/"):
        return Access.OPEN
    if path == "/metrics":
        return Access.METRICS
    return Access.READ if method in SAFE_METHODS else Access.WRITE


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, as given to ``--http``) is reachable from this machine only.
    A name other than ``localhost`` counts as beyond loopback: what it resolves to can change."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_required(host: str, requested: bool | None) -> bool:
    """``--auth`` (True), ``--no-auth`` (False) or neither (None) for a server listening on ``host``."""
    if requested is None:
        return not is_loopback(host)
    if not requested and not is_loopback(host):
        raise UserInputError(f"refusing to serve the API and dashboard on {host} without authentication: "
                             "beyond loopback every request needs a token (drop --no-auth)")
    return requested


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header; "" for any other Authorization header."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def caller(request: Request) -> Principal | None:
    """The checked caller of a request, or None when its route was open to it without a token."""
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='/')}", status_code=303)


def unauthorized(detail: str, *, invalid: bool) -> Response:
    challenge = 'Bearer realm="edgefleet"' + (', error="invalid_token"' if invalid else "")
    return problem(401, UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


class AuthMiddleware:
    """Checks every HTTP request against ``access_of`` before the app sees it (a pure ASGI middleware)."""

    def __init__(self, app: ASGIApp, verifier: TokenVerifier, required: bool) -> None:
        self.app = app
        self.verifier = verifier
        self.required = required

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        access = access_of(request.method, request.url.path)
        if access is Access.OPEN or (access is not Access.WRITE and not self.required):
            await self.app(scope, receive, send)
            return
        refusal, principal = await self._check(request, access)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _check(self, request: Request, access: Access) -> tuple[Response | None, Principal | None]:
        token = bearer_token(request)
        from_cookie = False
        if token is None and request.method in SAFE_METHODS:  # a cookie never authorises a write
            token, from_cookie = request.cookies.get(COOKIE) or None, True
        page = wants_page(request) and request.method in SAFE_METHODS
        if not token:
            if token is None and page:
                return login_redirect(request), None
            detail = ("this route needs an operator token: Authorization: Bearer <token>" if access is Access.WRITE
                      else "this route needs an API token: Authorization: Bearer <token>")
            return unauthorized(detail if token is None else "expected Authorization: Bearer <token>",
                                invalid=token is not None), None
        principal = await run_in_threadpool(self.verifier.verify, token)
        if principal is None:
            if from_cookie and page:
                response = login_redirect(request)
                response.delete_cookie(COOKIE, path="/")
                return response, None
            return unauthorized("the API token is not valid: unknown, rotated or revoked", invalid=True), None
        if principal.scope not in ALLOWED[access]:
            detail = (f"token {principal.name} has scope {principal.scope.value}, which does not allow "
                      f"{request.method} {request.url.path} (allowed: "
                      f"{', '.join(sorted(s.value for s in ALLOWED[access]))})")
            return (error_page(403, detail) if page else problem(403, FORBIDDEN, detail)), None
        return None, principal
