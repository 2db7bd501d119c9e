"""Bearer tokens for the HTTP API and dashboard: create, list, revoke, rotate, verify.

A token reads ``eft_<id>_<secret>``: the id (public: lists and logs name it) finds the row, the secret
(256 bits from ``secrets``) is never stored, only the sha256 of the whole token, compared in constant
time. A token is shown once, when it is created or rotated. Scopes:

- ``read``: every page and ``GET`` route (not ``/metrics``);
- ``operator``: everything ``read`` does, the write routes, and ``/metrics``;
- ``metrics``: ``/metrics`` only (a Prometheus scraper's token).

Every change is an audit entry (``token.created``, ``token.revoked``, ``token.rotated``) in the same
transaction. A revoked token's row is kept (its name stays taken), so the audit log's ``token <name>``
keeps meaning one holder.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from server import audit
from server.db import Database, Session
from server.db.models import ApiToken
from server.paths import DataDir
from shared.errors import AlreadyExistsError, NotFoundError, StorageError, UserInputError
from shared.files import write_private

logger = logging.getLogger(__name__)

PREFIX = "eft_"
SECRET_BYTES = 32  # 256 bits
ADMIN = "admin"  # the operator token ``edgefleet init`` creates and writes to DATA_DIR/api-token
TOUCH_INTERVAL_S = 60.0  # last_used_at is written at most this often per token
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_TOKEN = re.compile(r"^eft_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class Scope(str, enum.Enum):
    """Persisted in ``api_tokens.scope``: never rename a value."""

    READ = "read"
    OPERATOR = "operator"
    METRICS = "metrics"


@dataclass(frozen=True)
class IssuedToken:
    """A token as it is handed out, once: ``token`` is the secret the holder presents."""

    id: str
    name: str
    scope: Scope
    token: str


@dataclass(frozen=True)
class TokenInfo:
    """A token as lists show it: never its secret or its hash."""

    id: str
    name: str
    scope: Scope
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        return cls(id=row.id, name=row.name, scope=Scope(row.scope), created_at=_utc(row.created_at),
                   created_by=row.created_by, revoked_at=_utc_or_none(row.revoked_at),
                   last_used_at=_utc_or_none(row.last_used_at))

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the token it presented (checked)."""

    token_id: str
    name: str
    scope: Scope

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"token {self.name}"


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserInputError(f"invalid token name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
                             "starting with a letter or digit")
    return name


def _new_token(token_id: str) -> str:
    return f"{PREFIX}{token_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def _by_name(session: Session, name: str) -> ApiToken:
    row = session.query(ApiToken).filter_by(name=name).one_or_none()
    if row is None:
        raise NotFoundError(f"no API token named {name!r}; 'edgefleet token list' shows them")
    return row


Keep = Callable[[str], None]  # stores a new secret (e.g. in a 0600 file) before the transaction commits


def create_token(db: Database, name: str, scope: Scope, *, actor: str, keep: Keep | None = None) -> IssuedToken:
    """A new token; its secret is in the result and nowhere else. ``keep``, if given, stores the secret
    first: if it fails, nothing is committed (no token whose secret nobody has)."""
    _check_name(name)
    with db.session() as session:
        existing = session.query(ApiToken).filter_by(name=name).one_or_none()
        if existing is not None:
            state = "revoked; names are not reused" if existing.revoked_at is not None else "use 'token rotate'"
            raise AlreadyExistsError(f"an API token named {name!r} exists ({state})")
        token_id = secrets.token_hex(6)
        token = _new_token(token_id)
        session.add(ApiToken(id=token_id, name=name, scope=scope.value, token_sha256=token_sha256(token),
                             created_by=actor))
        audit.record(session, "token.created", f"API token {name} ({token_id}) created, scope {scope.value}",
                     actor=actor, data={"token": token_id, "name": name, "scope": scope.value})
        session.flush()  # a taken name fails here, before the secret is kept
        if keep is not None:
            keep(token)
    return IssuedToken(token_id, name, scope, token)


def list_tokens(db: Database) -> list[TokenInfo]:
    with db.reading() as session:
        return [TokenInfo.of(row) for row in session.query(ApiToken).order_by(ApiToken.created_at, ApiToken.name)]


def revoke_token(db: Database, name: str, *, actor: str) -> TokenInfo:
    """The token stops working at once (the next request is refused). Revoking twice changes nothing."""
    with db.session() as session:
        row = _by_name(session, name)
        if row.revoked_at is None:
            row.revoked_at = datetime.now(timezone.utc)
            audit.record(session, "token.revoked", f"API token {name} ({row.id}) revoked", actor=actor,
                         data={"token": row.id, "name": name, "scope": row.scope})
        return TokenInfo.of(row)


def rotate_token(db: Database, name: str, *, actor: str,
                 keep: Callable[[IssuedToken, str], None] | None = None) -> IssuedToken:
    """A new secret for the same name, id and scope; the old one stops working at once.

    ``keep``, if given, is called with the new token and the old one's sha256 (to recognise a file that
    held it) before the transaction commits: if it fails, the old secret stays valid."""
    with db.session() as session:
        row = _by_name(session, name)
        if row.revoked_at is not None:
            raise UserInputError(f"the API token {name!r} is revoked: create a new one under another name")
        old_sha256 = row.token_sha256
        token = _new_token(row.id)
        row.token_sha256 = token_sha256(token)
        audit.record(session, "token.rotated", f"API token {name} ({row.id}) rotated: the old secret is refused",
                     actor=actor, data={"token": row.id, "name": name, "scope": row.scope})
        issued = IssuedToken(row.id, name, Scope(row.scope), token)
        if keep is not None:
            keep(issued, old_sha256)
        return issued


# -- the admin token of ``edgefleet init`` and the DATA_DIR/api-token file ---------------------


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, mode 0600, atomically."""
    write_private(path, (token + "\n").encode("ascii"))


def ensure_admin_token(db: Database, data_dir: DataDir) -> IssuedToken | None:
    """The operator token ``admin``, written to DATA_DIR/api-token, on the first ``init``; None afterwards
    (it exists, or existed: a re-run never makes a second one). The file is written before the token is
    committed, so an ``init`` that fails half-way makes it again on the next run."""
    with db.reading() as session:
        if session.query(ApiToken).filter_by(name=ADMIN).one_or_none() is not None:
            return None
    return create_token(db, ADMIN, Scope.OPERATOR, actor=audit.operator(),
                        keep=lambda token: write_token_file(data_dir.api_token, token))


def file_holds(path: Path, sha256: str) -> bool:
    """Whether the token file at ``path`` holds the token with this hash (False when there is none)."""
    try:
        held = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(token_sha256(held), sha256)


# -- verifying a presented token ----------------------------------------------------------------


class _Stored(NamedTuple):
    name: str
    scope: Scope
    sha256: str
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenVerifier:
    """Checks presented tokens against the registry, one primary-key read per request, so a revocation
    or rotation by another process counts from the next request. ``last_used_at`` is written at most
    once per ``TOUCH_INTERVAL_S`` per token (per process; and only when the stored value is that old)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()  # requests are verified on the server's worker threads

    def verify(self, token: str) -> Principal | None:
        match = _TOKEN.match(token)
        if match is None:  # scanners send these: debug, so they cannot flood the log
            logger.debug("API token refused: not an edgefleet token")
            return None
        token_id = match.group(1)
        with self.db.reading() as session:
            row = session.get(ApiToken, token_id)
            stored = None if row is None else _Stored(row.name, Scope(row.scope), row.token_sha256, row.revoked_at,
                                                      row.last_used_at)
        # the hash is compared in constant time, also for an unknown id (against one that never matches)
        matches = hmac.compare_digest(token_sha256(token), stored.sha256 if stored else "-" * 64)
        if stored is None:
            logger.debug("API token refused: unknown id %s", token_id)
            return None
        if not matches:
            logger.info("API token refused: wrong secret for %s (%s), perhaps an old one from before a rotation",
                        stored.name, token_id)
            return None
        if stored.revoked_at is not None:
            logger.info("API token refused: %s (%s) is revoked", stored.name, token_id)
            return None
        principal = Principal(token_id, stored.name, stored.scope)
        self._touch(token_id, stored.last_used_at)
        return principal

    def _touch(self, token_id: str, stored: datetime | None) -> None:
        now = self.clock()
        with self._lock:
            if now - self._touched.get(token_id, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
                return
            self._touched[token_id] = now
        if stored is not None and now - _utc(stored).timestamp() < TOUCH_INTERVAL_S:
            return  # another process wrote it recently
        try:
            with self.db.session() as session:
                row = session.get(ApiToken, token_id)
                if row is not None:
                    row.last_used_at = datetime.fromtimestamp(now, timezone.utc)
        except StorageError as exc:  # a busy database must not refuse the request
            logger.warning("could not record the use of API token %s: %s", token_id, exc)


def token_json(info: TokenInfo) -> dict[str, Any]:
    def when(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {"id": info.id, "name": info.name, "scope": info.scope.value, "active": info.active,
            "created_at": when(info.created_at), "created_by": info.created_by, "revoked_at": when(info.revoked_at),
            "last_used_at": when(info.last_used_at)}
