"""A bounded on-disk outbox for the reports that must not be lost.

Events and telemetry are written here before they are published and deleted
once the broker acknowledged them; after a disconnect *and* a restart the
agent publishes what is left. Each message keeps its original
``(boot_id, seq)``, so the server's idempotent ingest ignores any copy it
already has.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.files import atomic_write_bytes
from shared.errors import EdgefleetError, StorageError

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Callable[[], bool]]


class Outbox:
    def __init__(self, directory: Path, publish: Publish, *, limit: int = 1000) -> None:
        self.directory = directory
        self.publish = publish
        self.limit = limit
        self._pending: dict[Path, Callable[[], bool]] = {}
        self._counter = 0

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("*.msg")) if self.directory.exists() else []

    def _publish(self, path: Path, topic: str, payload: bytes) -> None:
        try:
            self._pending[path] = self.publish(topic, payload)
        except EdgefleetError as exc:
            logger.warning("could not publish %s yet (kept in the outbox): %s", topic, exc)

    def send(self, topic: str, payload: bytes) -> None:
        self._counter += 1
        path = self.directory / f"{time.time_ns():020d}-{self._counter:06d}.msg"
        try:
            files = self._files()
            for old in files[: max(0, len(files) - self.limit + 1)]:
                logger.warning("outbox full: dropping the oldest report %s", old.name)
                old.unlink(missing_ok=True)
                self._pending.pop(old, None)
            atomic_write_bytes(path, json.dumps({"topic": topic, "payload": payload.decode()}).encode())
        except (StorageError, OSError) as exc:
            logger.warning("outbox not writable (%s): sending %s without a durable copy", exc, topic)
            self._publish(path, topic, payload)
            self._pending.pop(path, None)
            return
        self._publish(path, topic, payload)

    def replay(self) -> int:
        """Publish everything a previous run left unacknowledged; returns how many."""
        count = 0
        for path in self._files():
            if path in self._pending:
                continue
            try:
                message = json.loads(path.read_text())
                self._publish(path, str(message["topic"]), str(message["payload"]).encode())
                count += 1
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("dropping unreadable outbox entry %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
        return count

    def collect(self) -> None:
        """Forget the messages the broker has acknowledged."""
        for path, delivered in list(self._pending.items()):
            if delivered():
                path.unlink(missing_ok=True)
                del self._pending[path]

    def __len__(self) -> int:
        return len(self._files())
