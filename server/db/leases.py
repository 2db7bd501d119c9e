"""Leases in the database: which server replica does something at a time, on the database's clock.

Every statement is one conditional UPDATE of the lease's row (the migration
creates it), so taking, renewing and releasing never race on an INSERT. Time
is the database server's (``clock_timestamp()`` on PostgreSQL, not the
transaction's start), so replicas whose clocks disagree still agree on who
holds a lease. On PostgreSQL the UPDATE locks the row until the transaction
commits: a contender's UPDATE waits for it, then re-checks its condition
against the renewed row and changes nothing.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Float, bindparam, case, literal_column, select, update

from server.db import Session
from server.db.models import ServerLease

__all__ = ["database_clock", "expire_lease", "lease_holder", "release_lease", "renew_lease"]


def _now(session: Session) -> ColumnElement[float]:
    if session.get_bind().dialect.name == "postgresql":
        return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)", Float)
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)  # SQLite: ms resolution


def database_clock(session: Session) -> float:
    """The database server's time, in seconds since the epoch."""
    return float(session.scalar(select(_now(session))) or 0.0)


def renew_lease(session: Session, name: str, holder: str, ttl_s: float) -> bool:
    """Take the lease if it is free or expired, or extend it if ``holder`` has it: True when ``holder``
    holds it for ``ttl_s`` more seconds (until this transaction ends, nobody else can take it)."""
    now = _now(session)
    statement = (
        update(ServerLease)
        .where(ServerLease.name == name, (ServerLease.holder == holder) | (ServerLease.expires_at <= now))
        .values(
            holder=holder,
            expires_at=now + bindparam("ttl", ttl_s, Float),
            acquired_at=case((ServerLease.holder == holder, ServerLease.acquired_at), else_=now),
        )
        .execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1  # type: ignore[attr-defined,no-any-return]


def release_lease(session: Session, name: str, holder: str) -> bool:
    """Give the lease up at once (a clean stop), if ``holder`` has it."""
    statement = (
        update(ServerLease).where(ServerLease.name == name, ServerLease.holder == holder)
        .values(expires_at=0.0).execution_options(synchronize_session=False)
    )
    return session.execute(statement).rowcount == 1  # type: ignore[attr-defined,no-any-return]


def expire_lease(session: Session, name: str) -> None:
    """Whoever holds the lease is known to be dead (the single-server lock proves it): free it now."""
    session.execute(update(ServerLease).where(ServerLease.name == name).values(expires_at=0.0)
                    .execution_options(synchronize_session=False))


def lease_holder(session: Session, name: str) -> tuple[str, float] | None:
    """The lease's holder and how many seconds it has left (0 when expired), or None if nobody has held it."""
    row = session.execute(select(ServerLease.holder, ServerLease.expires_at - _now(session))
                          .where(ServerLease.name == name)).one_or_none()
    if row is None or not row[0]:
        return None
    return row[0], max(0.0, float(row[1]))
