"""Where a server's data directory keeps things."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.replicas import DEFAULT_REPLICA


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "edgefleet.db"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def blobs(self) -> Path:
        return self.root / "artifacts"

    @property
    def broker(self) -> Path:
        """The fleet broker's configuration, identities and certificates (``server/broker_setup.py``)."""
        return self.root / "broker"

    @property
    def settings(self) -> Path:
        """Server settings ``edgefleet init`` records (the database URL, ``server/db_location.py``), mode 0600."""
        return self.root / "server.json"

    @property
    def api_token(self) -> Path:
        """The operator token ``edgefleet init`` creates (``admin``), mode 0600, for API clients on this host."""
        return self.root / "api-token"

    @property
    def session_id(self) -> Path:
        """The server's MQTT client id suffix: stable, so its persistent broker session outlives restarts."""
        return self.root / "mqtt-session-id"

    def replica_session_id(self, replica: str) -> Path:
        """``session_id`` of a named replica: each replica sharing the directory has its own session."""
        return self.session_id if replica == DEFAULT_REPLICA else self.root / f"mqtt-session-id-{replica}"

    @property
    def server_lock(self) -> Path:
        """Held by the one server running on this directory's SQLite database (``server/server_lock.py``)."""
        return self.root / "server.lock"
