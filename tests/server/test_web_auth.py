"""HTTP authentication (``server.web.auth``, ``server.web.login``, ``server.web.actions``) through FastAPI's
TestClient over a seeded registry: every token scope against every class of route, with auth on and off,
the login cookie, the operator write routes and their audit entries, and that no token is ever logged."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.api_tokens import Scope, create_token, revoke_token, rotate_token
from server.db.models import AuditEvent
from server.devices import register_device
from server.setup import Workspace
from server.web import create_app
from server.web.auth import COOKIE, access_of, auth_required, is_loopback
from server.web.login import safe_next
from server.web.problems import CONFLICT, FORBIDDEN, NOT_FOUND, PROBLEM_JSON, UNAUTHORIZED
from shared.errors import UserInputError
from tests.server.rollout_helpers import start_all_at_once
from tests.server.web_seed import Seeded, seeded_copy

ACTOR = "operator test@host"


@dataclass(frozen=True)
class Tokens:
    read: str
    operator: str
    metrics: str
    revoked: str
    bad: str = "eft_000000000000_" + "A" * 43  # well-formed, unknown
    malformed: str = "hunter2"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path,
           digits_inputs: tuple[Path, Path]) -> Iterator[Seeded]:
    with seeded_copy(template_data_dir, tmp_path_factory.mktemp("auth") / "data", digits_inputs) as seeded:
        yield seeded


@pytest.fixture(scope="module")
def tokens(seeded: Seeded) -> Tokens:
    db = seeded.db
    revoked = create_token(db, "gone", Scope.OPERATOR, actor=ACTOR).token
    revoke_token(db, "gone", actor=ACTOR)
    return Tokens(read=create_token(db, "viewer", Scope.READ, actor=ACTOR).token,
                  operator=create_token(db, "ops", Scope.OPERATOR, actor=ACTOR).token,
                  metrics=create_token(db, "prom", Scope.METRICS, actor=ACTOR).token, revoked=revoked)


@pytest.fixture(scope="module")
def locked(seeded: Seeded) -> Iterator[TestClient]:
    """The app as it serves beyond loopback (or with --auth)."""
    with TestClient(create_app(seeded.db, clock=lambda: seeded.now, auth_required=True),
                    follow_redirects=False) as client:
        yield client


@pytest.fixture(scope="module")
def open_loopback(seeded: Seeded) -> Iterator[TestClient]:
    """The app as it serves on loopback without --auth."""
    with TestClient(create_app(seeded.db, clock=lambda: seeded.now), follow_redirects=False) as client:
        yield client


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def problem_of(response: httpx.Response, status: int, type_: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, object] = response.json()
    assert body["type"] == type_ and body["status"] == status and body["detail"]
    return body


# -- every credential against every class of route ------------------------------------------------------

ROUTES = {  # one of each class (server.web.auth.access_of); the write targets an unknown rollout: no change
    "read": ("GET", "/api/v1/devices"),
    "write": ("POST", "/api/v1/rollouts/r-unknown/pause"),
    "metrics": ("GET", "/metrics"),
    "healthz": ("GET", "/healthz"),
    "page": ("GET", "/devices/cam-1"),
    "openapi": ("GET", "/openapi.json"),
    "docs": ("GET", "/docs"),
}
LOGIN = 303  # a page without a token: to the login page
NOT_FOUND_ROLLOUT = 404  # the write route let through: the rollout is unknown
# credential -> route -> status, with auth on
LOCKED = {
    "none": {"read": 401, "write": 401, "metrics": 401, "healthz": 200, "page": LOGIN, "openapi": 401, "docs": LOGIN},
    "bad": {"read": 401, "write": 401, "metrics": 401, "healthz": 200, "page": 401, "openapi": 401, "docs": 401},
    "malformed": {"read": 401, "write": 401, "metrics": 401, "healthz": 200, "page": 401, "openapi": 401, "docs": 401},
    "revoked": {"read": 401, "write": 401, "metrics": 401, "healthz": 200, "page": 401, "openapi": 401, "docs": 401},
    "read": {"read": 200, "write": 403, "metrics": 403, "healthz": 200, "page": 200, "openapi": 200, "docs": 200},
    "operator": {"read": 200, "write": NOT_FOUND_ROLLOUT, "metrics": 200, "healthz": 200, "page": 200, "openapi": 200,
                 "docs": 200},
    "metrics": {"read": 403, "write": 403, "metrics": 200, "healthz": 200, "page": 403, "openapi": 403, "docs": 403},
}
# with auth off (loopback without --auth): reads are open, a write still needs an operator token
OPEN = {
    credential: {route: (statuses[route] if route == "write" else 200) for route in ROUTES}
    for credential, statuses in LOCKED.items()
}


def token_of(tokens: Tokens, credential: str) -> str | None:
    return None if credential == "none" else getattr(tokens, credential)  # type: ignore[no-any-return]


def check(client: TestClient, tokens: Tokens, credential: str, route: str, expected: int) -> None:
    method, path = ROUTES[route]
    response = client.request(method, path, headers=bearer(token_of(tokens, credential)))
    assert response.status_code == expected, (credential, route, response.text)
    if expected == 401:
        problem_of(response, 401, UNAUTHORIZED)
        assert response.headers["www-authenticate"].startswith("Bearer")
        if credential != "none":
            assert 'error="invalid_token"' in response.headers["www-authenticate"]
    elif expected == 403:
        if route in ("page", "docs"):  # a page's refusal is a page
            assert response.headers["content-type"].startswith("text/html") and "Forbidden" in response.text
        else:
            body = problem_of(response, 403, FORBIDDEN)
            assert f"scope {credential}" in str(body["detail"])
    elif expected == LOGIN:
        assert response.headers["location"] == f"/login?next={path}"
    elif route == "write":
        problem_of(response, 404, NOT_FOUND)


@pytest.mark.parametrize("credential", list(LOCKED))
@pytest.mark.parametrize("route", list(ROUTES))
def test_with_auth_on_every_route_checks_the_token_and_its_scope(locked: TestClient, tokens: Tokens, credential: str,
                                                                  route: str) -> None:
    check(locked, tokens, credential, route, LOCKED[credential][route])


@pytest.mark.parametrize("credential", list(OPEN))
@pytest.mark.parametrize("route", list(ROUTES))
def test_on_loopback_without_auth_reads_stay_open_and_writes_need_an_operator(
        open_loopback: TestClient, tokens: Tokens, credential: str, route: str) -> None:
    check(open_loopback, tokens, credential, route, OPEN[credential][route])


def test_the_answers_behind_the_check_are_the_real_ones(locked: TestClient, tokens: Tokens) -> None:
    devices = locked.get("/api/v1/devices", headers=bearer(tokens.read)).json()
    assert sorted(d["name"] for d in devices) == ["cam-1", "cam-2", "pi-1"]
    assert "edgefleet_devices" in locked.get("/metrics", headers=bearer(tokens.metrics)).text
    schema = locked.get("/openapi.json", headers=bearer(tokens.read)).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {"type": "http", "scheme": "bearer"}
    assert "/api/v1/rollouts/{rollout_id}/pause" in schema["paths"]
    page = locked.get("/devices/cam-1", headers=bearer(tokens.read))
    assert 'data-device="cam-1"' in page.text and "Log out" in page.text and "viewer" in page.text
    assert 'href="/metrics"' not in page.text  # a read token may not follow it
    assert 'href="/metrics"' in locked.get("/devices/cam-1", headers=bearer(tokens.operator)).text
    assert locked.get("/devices/nobody", headers=bearer(tokens.read)).status_code == 404  # checked, then not found


def test_other_authorization_schemes_and_unknown_paths_are_refused(locked: TestClient, tokens: Tokens) -> None:
    basic = locked.get("/api/v1/devices", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert "expected Authorization: Bearer" in str(problem_of(basic, 401, UNAUTHORIZED)["detail"])
    # default deny: a path no route serves is still checked first
    problem_of(locked.get("/api/v1/nothing-here"), 401, UNAUTHORIZED)
    problem_of(locked.get("/api/v1/nothing-here", headers=bearer(tokens.read)), 404, NOT_FOUND)
    problem_of(locked.delete("/api/v1/devices/cam-1", headers=bearer(tokens.read)), 403, FORBIDDEN)
    assert locked.get("/static/dashboard.css").status_code == 200  # the login page's style is open


def test_a_rotated_token_fails_at_once_and_its_new_secret_works(locked: TestClient, seeded: Seeded) -> None:
    old = create_token(seeded.db, "rotating", Scope.READ, actor=ACTOR).token
    assert locked.get("/api/v1/rollouts", headers=bearer(old)).status_code == 200
    new = rotate_token(seeded.db, "rotating", actor=ACTOR)
    problem_of(locked.get("/api/v1/rollouts", headers=bearer(old)), 401, UNAUTHORIZED)
    assert locked.get("/api/v1/rollouts", headers=bearer(new.token)).status_code == 200
    revoke_token(seeded.db, "rotating", actor=ACTOR)
    problem_of(locked.get("/api/v1/rollouts", headers=bearer(new.token)), 401, UNAUTHORIZED)


# -- the login page and its cookie -------------------------------------------------------------------


def login(client: TestClient, token: str, next_path: str = "/", **headers: str) -> httpx.Response:
    return client.post("/login", data={"token": token, "next": next_path}, headers=headers)


def test_the_login_form_sets_an_httponly_strict_cookie_and_redirects(seeded: Seeded, tokens: Tokens) -> None:
    with TestClient(create_app(seeded.db, auth_required=True), follow_redirects=False) as client:
        redirect = client.get("/rollouts/" + seeded.rollouts[0])
        assert redirect.status_code == 303
        form = client.get(redirect.headers["location"])
        assert form.status_code == 200 and 'name="token"' in form.text
        assert f'value="/rollouts/{seeded.rollouts[0]}"' in form.text
        response = login(client, tokens.read, f"/rollouts/{seeded.rollouts[0]}")
        assert response.status_code == 303 and response.headers["location"] == f"/rollouts/{seeded.rollouts[0]}"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/" in cookie and "Secure" not in cookie  # plain HTTP here
        assert client.get("/").status_code == 200
        assert client.get("/api/v1/devices").status_code == 200  # dashboard.js fetches with the cookie
        # the cookie never authorises a write, even an operator's (no cross-site request forgery)
        login(client, tokens.operator)
        problem_of(client.post("/api/v1/rollouts/r-unknown/pause"), 401, UNAUTHORIZED)
        out = client.post("/logout")
        assert out.status_code == 303 and out.headers["location"] == "/login" and COOKIE not in client.cookies
        assert client.get("/").status_code == 303


def test_the_cookie_is_secure_over_https(seeded: Seeded, tokens: Tokens) -> None:
    with TestClient(create_app(seeded.db, auth_required=True), base_url="https://fleet.example",
                    follow_redirects=False) as client:
        cookie = login(client, tokens.read).headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_a_login_with_a_bad_or_metrics_token_sets_no_cookie(locked: TestClient, tokens: Tokens) -> None:
    for token, message in ((tokens.bad, "not valid"), (tokens.revoked, "not valid"), ("", "not valid"),
                           (tokens.malformed, "not valid"), (tokens.metrics, "metrics scope")):
        response = login(locked, token)
        assert response.status_code == 200 and message in response.text, token  # the form again, with the reason
        assert 'name="token"' in response.text and "set-cookie" not in response.headers


def test_a_login_goes_back_only_to_this_server(locked: TestClient, tokens: Tokens) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "evil", ""):
        assert safe_next(target) == "/", target
        assert login(locked, tokens.read, target).headers["location"] == "/"
    assert safe_next("/devices/cam-1?range=1h") == "/devices/cam-1?range=1h"
    foreign = login(locked, tokens.read, Origin="https://evil.example")
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
    assert login(locked, tokens.read, Origin="http://testserver").status_code == 303


def test_a_revoked_login_goes_back_to_the_login_page(seeded: Seeded) -> None:
    token = create_token(seeded.db, "short-lived", Scope.READ, actor=ACTOR).token
    with TestClient(create_app(seeded.db, auth_required=True), follow_redirects=False) as client:
        login(client, token)
        assert client.get("/").status_code == 200
        revoke_token(seeded.db, "short-lived", actor=ACTOR)
        page = client.get("/")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/"
        assert f'{COOKIE}=""' in page.headers["set-cookie"]  # and the stale cookie is dropped
        problem_of(client.get("/api/v1/devices"), 401, UNAUTHORIZED)  # what dashboard.js then sees


def test_no_token_is_ever_logged(seeded: Seeded, tokens: Tokens, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(seeded.db, auth_required=True), follow_redirects=False) as client:
        for token in (tokens.read, tokens.operator, tokens.metrics, tokens.revoked, tokens.bad, tokens.malformed):
            client.get("/api/v1/devices", headers=bearer(token))
            client.post("/api/v1/rollouts/r-unknown/abort", headers=bearer(token))
            login(client, token)
            client.get("/")
    assert "refused" in caplog.text  # the refusals were logged
    secrets_ = [t.split("_", 2)[-1] for t in (tokens.read, tokens.operator, tokens.metrics, tokens.revoked,
                                               tokens.bad)] + [tokens.malformed]
    assert not [s for s in secrets_ if s in caplog.text]


# -- the operator write routes -------------------------------------------------------------------------


@pytest.fixture
def running(workspace: Workspace) -> tuple[Workspace, str]:
    """A running rollout of digits:1 to one device."""
    register_device(workspace.db, "cam-9", "x86-64")
    return workspace, start_all_at_once(workspace, "cam-9")


def audit_entries(workspace: Workspace, rollout_id: str) -> list[tuple[str, str, str]]:
    with workspace.db.reading() as session:
        return [(e.kind, e.actor, e.message) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.rollout_id == rollout_id).order_by(AuditEvent.id))]


def test_an_operator_token_pauses_resumes_and_aborts_a_rollout(running: tuple[Workspace, str]) -> None:
    workspace, rollout_id = running
    ops = create_token(workspace.db, "release-bot", Scope.OPERATOR, actor=ACTOR).token
    viewer = create_token(workspace.db, "viewer", Scope.READ, actor=ACTOR).token
    with TestClient(create_app(workspace.db, auth_required=True)) as client:
        def act(verb: str, token: str) -> httpx.Response:
            return client.post(f"/api/v1/rollouts/{rollout_id}/{verb}", headers=bearer(token))

        def state() -> str:
            return str(client.get(f"/api/v1/rollouts/{rollout_id}", headers=bearer(viewer)).json()["state"])

        problem_of(act("pause", viewer), 403, FORBIDDEN)
        assert state() == "running"
        paused = act("pause", ops)
        assert paused.status_code == 200, paused.text
        assert paused.json() == {"rollout": rollout_id, "state": "paused", "state_reason": "paused by token release-bot",
                                 "actor": "token release-bot"}
        assert state() == "paused"
        conflict = problem_of(act("pause", ops), 409, CONFLICT)
        assert conflict["detail"] == f"rollout {rollout_id} is paused: it cannot be paused"
        assert act("resume", ops).json()["state"] == "running"
        assert act("abort", ops).json()["state"] == "aborted"
        conflict = problem_of(act("resume", ops), 409, CONFLICT)
        assert conflict["detail"] == f"rollout {rollout_id} is aborted: it cannot be resumed"
        problem_of(act("rollback", viewer), 403, FORBIDDEN)
        problem_of(client.post("/api/v1/rollouts/r-unknown/resume", headers=bearer(ops)), 404, NOT_FOUND)
    assert [(kind, actor) for kind, actor, _ in audit_entries(workspace, rollout_id)][-3:] == [("rollout.paused", "token release-bot"), ("rollout.running", "token release-bot"),
                                ("rollout.aborted", "token release-bot")]


def test_an_operator_token_rolls_a_rollout_back_as_the_cli_does(running: tuple[Workspace, str]) -> None:
    workspace, rollout_id = running
    ops = create_token(workspace.db, "ops", Scope.OPERATOR, actor=ACTOR).token
    with TestClient(create_app(workspace.db)) as client:  # on loopback without --auth: a token all the same
        problem_of(client.post(f"/api/v1/rollouts/{rollout_id}/rollback"), 401, UNAUTHORIZED)
        response = client.post(f"/api/v1/rollouts/{rollout_id}/rollback", headers=bearer(ops))
        assert response.status_code == 200 and response.json()["state"] == "rolled_back"
    kind, actor, message = audit_entries(workspace, rollout_id)[-1]
    assert (kind, actor, message) == ("rollout.rolled_back", "token ops", "rollout rolled back (was running)")


# -- when auth is on ---------------------------------------------------------------------------------


def test_auth_is_on_beyond_loopback_and_cannot_be_turned_off_there() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host) and auth_required(host, None) is False and auth_required(host, True) is True
        assert auth_required(host, False) is False
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "fleet.example", "localhost.example"):
        assert not is_loopback(host) and auth_required(host, None) is True and auth_required(host, True) is True
        with pytest.raises(UserInputError, match=f"refusing to serve the API and dashboard on {host} without"):
            auth_required(host, False)


def test_every_request_has_a_class_and_only_the_listed_ones_are_open() -> None:
    assert {access_of("GET", p).value for p in ("/healthz", "/login", "/static/dashboard.js")} == {"open"}
    assert access_of("POST", "/login").value == "open" and access_of("POST", "/logout").value == "open"
    assert access_of("GET", "/metrics").value == "metrics"
    assert {access_of(m, p).value for m in ("GET", "HEAD") for p in ("/", "/docs", "/openapi.json", "/api/v1/x",
                                                                     "/healthz/", "/anything")} == {"read"}
    assert {access_of(m, "/api/v1/x").value for m in ("POST", "PUT", "PATCH", "DELETE")} == {"write"}


def test_a_huge_or_strange_login_form_is_refused_plainly(locked: TestClient, tokens: Tokens) -> None:
    huge = locked.post("/login", content=b"token=" + b"x" * 100_000,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413 and "set-cookie" not in huge.headers
    many = locked.post("/login", content="&".join(f"f{i}=1" for i in range(20)),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert many.status_code == 400 and "set-cookie" not in many.headers
    assert login(locked, f" {tokens.read}\n").status_code == 303  # pasted with white space around it
