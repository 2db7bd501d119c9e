"""The registry of server replicas (``server/replicas.py``): written by each replica as it starts."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import select

from server.db import Database
from server.db.models import ServerReplica


def register_replica(db: Database, name: str, host: str, pid: int) -> None:
    """Add the replica, or note that it started again (where, as which process)."""
    with db.session() as session:
        row = session.get(ServerReplica, name) or ServerReplica(name=name)
        row.host, row.pid, row.started_at = host, pid, datetime.now(timezone.utc)
        session.add(row)


def replica_names(db: Database) -> list[str]:
    with db.reading() as session:
        return list(session.scalars(select(ServerReplica.name).order_by(ServerReplica.name)))
