"""API tokens (``server.api_tokens``) and ``edgefleet token`` / ``edgefleet init`` on a real SQLite data directory."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from sqlalchemy import select

from server.api_tokens import (
    TOUCH_INTERVAL_S,
    Scope,
    TokenVerifier,
    create_token,
    list_tokens,
    revoke_token,
    rotate_token,
    token_sha256,
)
from server.db import Database
from server.db.models import ApiToken, AuditEvent
from server.setup import Workspace, init_data_dir, open_workspace
from shared.errors import AlreadyExistsError, NotFoundError, StorageError, UserInputError
from tests.server.test_cli_errors import assert_ok, assert_user_error, run

TOKEN = re.compile(r"^eft_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")
ACTOR = "operator test@host"


@pytest.fixture
def workspace(tmp_path: Path, db_url: str) -> Workspace:
    """An initialised data directory without a model (init_data_dir: no admin token), on each back-end."""
    return init_data_dir(tmp_path / "data", db_url=db_url)


@pytest.fixture
def db(workspace: Workspace) -> Database:
    return workspace.db


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rows(db: Database) -> list[dict[str, object]]:
    """Every stored column of every token."""
    with db.reading() as session:
        return [{c.name: getattr(row, c.name) for c in ApiToken.__table__.columns}
                for row in session.scalars(select(ApiToken))]


def audit_kinds(db: Database) -> list[tuple[str, str]]:
    with db.reading() as session:
        return [(e.kind, e.actor) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]


def test_a_token_has_256_bits_of_secret_and_only_its_hash_is_stored(db: Database) -> None:
    issued = create_token(db, "ci", Scope.READ, actor=ACTOR)
    assert TOKEN.match(issued.token) and issued.token.startswith(f"eft_{issued.id}_")
    (row,) = rows(db)
    assert row["token_sha256"] == token_sha256(issued.token) and row["scope"] == "read"
    assert row["created_by"] == ACTOR and row["id"] == issued.id and row["name"] == "ci"
    secret = issued.token[len(f"eft_{issued.id}_"):]
    stored = " ".join(str(v) for v in row.values())
    assert issued.token not in stored and secret not in stored
    assert audit_kinds(db) == [("token.created", ACTOR)]
    other = create_token(db, "ci-2", Scope.READ, actor=ACTOR)
    assert other.token != issued.token and other.id != issued.id


def test_verify_accepts_the_token_and_refuses_anything_else(db: Database) -> None:
    issued = create_token(db, "ops", Scope.OPERATOR, actor=ACTOR)
    verifier = TokenVerifier(db)
    principal = verifier.verify(issued.token)
    assert principal is not None and (principal.name, principal.scope, principal.actor) == (
        "ops", Scope.OPERATOR, "token ops")
    secret = issued.token[len(f"eft_{issued.id}_"):]
    wrong_secret = f"eft_{issued.id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    unknown_id = f"eft_{'0' * 12}_{secret}"
    for bad in ("", "x", issued.token + "x", issued.token[:-1], wrong_secret, unknown_id, issued.token.upper(),
                f" {issued.token}", token_sha256(issued.token), "eft_\u00e9" * 10):
        assert verifier.verify(bad) is None, bad


def test_revoke_refuses_the_token_at_once_and_keeps_its_name_taken(db: Database) -> None:
    issued = create_token(db, "ci", Scope.READ, actor=ACTOR)
    verifier = TokenVerifier(db)
    assert verifier.verify(issued.token) is not None
    info = revoke_token(db, "ci", actor=ACTOR)
    assert not info.active and info.revoked_at is not None
    assert verifier.verify(issued.token) is None  # the same long-lived verifier: no cache
    assert revoke_token(db, "ci", actor=ACTOR).revoked_at == info.revoked_at  # twice: nothing changes
    with pytest.raises(AlreadyExistsError, match="revoked"):
        create_token(db, "ci", Scope.READ, actor=ACTOR)
    with pytest.raises(UserInputError, match="revoked"):
        rotate_token(db, "ci", actor=ACTOR)
    with pytest.raises(NotFoundError, match="no API token named 'nobody'"):
        revoke_token(db, "nobody", actor=ACTOR)
    assert audit_kinds(db) == [("token.created", ACTOR), ("token.revoked", ACTOR)]


def test_rotate_makes_the_old_secret_fail_at_once(db: Database) -> None:
    old = create_token(db, "scraper", Scope.METRICS, actor=ACTOR)
    verifier = TokenVerifier(db)
    assert verifier.verify(old.token) is not None
    kept: list[tuple[str, str]] = []
    new = rotate_token(db, "scraper", actor=ACTOR, keep=lambda issued, old_sha256: kept.append(
        (issued.token, old_sha256)))
    assert kept == [(new.token, token_sha256(old.token))]
    assert (new.id, new.name, new.scope) == (old.id, "scraper", Scope.METRICS) and new.token != old.token
    assert verifier.verify(old.token) is None
    principal = verifier.verify(new.token)
    assert principal is not None and principal.scope is Scope.METRICS
    assert [k for k, _ in audit_kinds(db)] == ["token.created", "token.rotated"]


def test_a_secret_that_cannot_be_kept_commits_nothing(db: Database) -> None:
    def fail(*_: object) -> None:
        raise StorageError("cannot write the API token to /nowhere: disk full")

    with pytest.raises(StorageError):
        create_token(db, "ci", Scope.READ, actor=ACTOR, keep=fail)
    assert list_tokens(db) == [] and audit_kinds(db) == []
    issued = create_token(db, "ci", Scope.READ, actor=ACTOR)
    with pytest.raises(StorageError):
        rotate_token(db, "ci", actor=ACTOR, keep=fail)
    assert TokenVerifier(db).verify(issued.token) is not None  # the old secret still works
    assert [k for k, _ in audit_kinds(db)] == ["token.created"]


def test_names_are_checked_and_unique(db: Database) -> None:
    for bad in ("", "with space", "-lead", "x" * 65, "a/b", "ünicode"):
        with pytest.raises(UserInputError, match="invalid token name"):
            create_token(db, bad, Scope.READ, actor=ACTOR)
    create_token(db, "grafana@lab", Scope.READ, actor=ACTOR)
    with pytest.raises(AlreadyExistsError, match="token rotate"):
        create_token(db, "grafana@lab", Scope.OPERATOR, actor=ACTOR)
    assert [t.name for t in list_tokens(db)] == ["grafana@lab"]


def test_last_used_is_written_at_most_once_a_minute(db: Database) -> None:
    issued = create_token(db, "ops", Scope.OPERATOR, actor=ACTOR)
    clock = Clock()
    verifier = TokenVerifier(db, clock)

    def last_used() -> float | None:
        (info,) = list_tokens(db)
        return None if info.last_used_at is None else info.last_used_at.timestamp()

    assert last_used() is None
    verifier.verify(issued.token)
    assert last_used() == clock.now
    first = clock.now
    clock.now += TOUCH_INTERVAL_S - 1
    verifier.verify(issued.token)
    assert last_used() == first  # within the minute: not written
    clock.now += 2
    verifier.verify(issued.token)
    assert last_used() == clock.now
    # a second server process (its own verifier) does not write what another wrote within the minute
    clock.now += 5
    TokenVerifier(db, clock).verify(issued.token)
    assert last_used() == clock.now - 5


# -- the CLI -----------------------------------------------------------------------------------------


def test_init_creates_the_admin_token_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = assert_ok(run("init", "--data-dir", data, "--release-key", "online"))
    token_file = data / "api-token"
    assert f"written to {token_file}" in out and "(mode 0600)" in out
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert TOKEN.match(token) and token not in out
    again = assert_ok(run("init", "--data-dir", data, "--release-key", "online"))
    assert "api-token" not in again and token_file.read_text().strip() == token
    workspace = open_workspace(data)
    try:
        ((name, scope),) = [(t.name, t.scope) for t in list_tokens(workspace.db)]
        assert (name, scope) == ("admin", Scope.OPERATOR)
        principal = TokenVerifier(workspace.db).verify(token)
        assert principal is not None and principal.actor == "token admin"
    finally:
        workspace.db.close()


def test_token_commands_create_list_rotate_revoke(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert_ok(run("init", "--data-dir", data, "--release-key", "online"))
    created = run("token", "create", "grafana", "--scope", "read", "--data-dir", data)
    token = assert_ok(created).strip()
    assert TOKEN.match(token) and "shown once" in created.stderr
    listing = json.loads(assert_ok(run("token", "list", "--json", "--data-dir", data)))
    assert [(t["name"], t["scope"], t["active"]) for t in listing] == [("admin", "operator", True),
                                                                        ("grafana", "read", True)]
    assert not any(token in json.dumps(t) or "sha256" in json.dumps(t) for t in listing)
    assert "grafana" in assert_ok(run("token", "list", "--data-dir", data))

    # rotating admin rewrites DATA_DIR/api-token, which held its old secret
    admin_file = data / "api-token"
    before = admin_file.read_text()
    rotated = run("token", "rotate", "admin", "--data-dir", data)
    assert assert_ok(rotated) == "" and f"written to {admin_file}" in rotated.stderr
    assert admin_file.read_text() != before and stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    # rotating another token prints it; --out writes it to a 0600 file instead
    new = assert_ok(run("token", "rotate", "grafana", "--data-dir", data)).strip()
    assert TOKEN.match(new) and new != token
    out_file = tmp_path / "secrets" / "grafana-token"
    assert assert_ok(run("token", "create", "prom", "--scope", "metrics", "--out", out_file, "--data-dir", data)) == ""
    assert TOKEN.match(out_file.read_text().strip()) and stat.S_IMODE(out_file.stat().st_mode) == 0o600

    assert "revoked" in assert_ok(run("token", "revoke", "grafana", "--data-dir", data))
    workspace = open_workspace(data)
    try:
        verifier = TokenVerifier(workspace.db)
        assert verifier.verify(token) is None and verifier.verify(new) is None
        assert verifier.verify(admin_file.read_text().strip()) is not None
        assert verifier.verify(before.strip()) is None
    finally:
        workspace.db.close()
    revoked = json.loads(assert_ok(run("token", "list", "--json", "--data-dir", data)))[1]
    assert revoked["name"] == "grafana" and not revoked["active"] and revoked["revoked_at"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["token", "create", "bad name", "--scope", "read"], "invalid token name"),
        (["token", "create", "admin", "--scope", "read"], "an API token named 'admin' exists"),
        (["token", "revoke", "nobody"], "no API token named 'nobody'"),
        (["token", "rotate", "nobody"], "no API token named 'nobody'"),
        (["token", "create", "ci", "--scope", "read", "--out", "{data}/api-token/x"], "cannot write {data}/api-token/x"),
    ],
    ids=["bad name", "taken", "revoke unknown", "rotate unknown", "unwritable --out"],
)
def test_token_mistakes_are_one_line_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    data = tmp_path / "data"
    assert_ok(run("init", "--data-dir", data, "--release-key", "online"))
    assert_user_error(run(*(a.format(data=data) for a in args), "--data-dir", data), fragment.format(data=data))
    assert [t["name"] for t in json.loads(assert_ok(run("token", "list", "--json", "--data-dir", data)))] == ["admin"]


def test_an_unknown_scope_is_a_usage_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert_ok(run("init", "--data-dir", data, "--release-key", "online"))
    result = run("token", "create", "x", "--scope", "admin", "--data-dir", data)
    assert result.exit_code == 2 and "'admin' is not one of 'read', 'operator', 'metrics'" in result.stderr
