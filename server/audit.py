"""The audit log: every rollout decision and operator action, appended with its numbers.

Rows are only ever added. ``record`` joins the caller's transaction, so an
entry exists exactly when the change it describes was committed.
"""

from __future__ import annotations

import getpass
import logging
import socket
from typing import Any

from server.db import Session
from server.db.models import AuditEvent

logger = logging.getLogger(__name__)

SERVER = "server"


def operator() -> str:
    """Who runs this command, as the log names them: ``operator <user>@<host>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "unknown"
    return f"operator {user}@{socket.gethostname()}"


def record(
    session: Session,
    kind: str,
    message: str,
    *,
    actor: str = SERVER,
    rollout_id: str | None = None,
    device_id: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Append one entry (``kind`` like ``wave.gate_failed``; ``message`` a sentence with the numbers)."""
    session.add(AuditEvent(kind=kind, actor=actor, rollout_id=rollout_id, device_id=device_id, message=message,
                           data=data or {}))
    logger.info("%s: %s", kind, message)
