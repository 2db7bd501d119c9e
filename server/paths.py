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

    def database_url(self) -> str:
        return f"sqlite:///{self.database}"
