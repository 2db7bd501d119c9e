"""Where a server's data directory keeps things."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    def settings(self) -> Path:
        return self.root / "server.json"

    @property
    def session_id(self) -> Path:
        """The server's MQTT client id suffix: stable, so its persistent broker session outlives restarts."""
        return self.root / "mqtt-session-id"

    def database_url(self) -> str:
        return f"sqlite:///{self.database}"
