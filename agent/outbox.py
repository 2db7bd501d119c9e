"""A bounded on-disk outbox for the reports that must not be lost.

Events and telemetry are written here before they are published and deleted
once the broker acknowledged them to a listener; after a disconnect *and* a
restart the agent publishes what is left. Each message keeps its original
``(boot_id, seq)``, so the server's idempotent ingest ignores any copy it
already has.

Within one run, paho holds every handed-over message and re-sends it on each
new connection until the broker acknowledges it; the outbox only waits for
that acknowledgement (``delivered``). Two cases send a message again: a
publish the link refused outright, and a message the broker acknowledged
with "no matching subscribers" — no server session (not even a persistent
one) was there to receive it, so it is offered again later instead of being
forgotten.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.files import atomic_write_bytes
from shared.errors import EdgefleetError, StorageError
from shared.failpoints import failpoint

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], "int | None"]  # returns the message id, or None if nothing was queued

UNHEARD_RETRY_S = 30.0
REFUSED_RETRY_S = 5.0


@dataclass
class _Entry:
    path: Path
    topic: str
    payload: bytes
    retry_at: float = 0.0  # when an unsent or unheard entry is offered again


class Outbox:
    def __init__(
        self,
        directory: Path,
        publish: Publish,
        *,
        limit: int = 1000,
        unheard_retry_s: float = UNHEARD_RETRY_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.publish = publish
        self.limit = limit
        self.unheard_retry_s = unheard_retry_s
        self.monotonic = monotonic
        self._in_flight: dict[int, _Entry] = {}  # mid -> entry paho holds until acknowledged
        self._waiting: dict[Path, _Entry] = {}  # entries to offer again at retry_at
        self._counter = 0

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("*.msg")) if self.directory.exists() else []

    def _hand_over(self, entry: _Entry) -> None:
        try:
            mid = self.publish(entry.topic, entry.payload)
        except EdgefleetError as exc:
            logger.warning("could not publish %s yet (kept in the outbox): %s", entry.topic, exc)
            mid = None
        if mid is None:
            entry.retry_at = self.monotonic() + REFUSED_RETRY_S
            self._waiting[entry.path] = entry
        else:
            self._waiting.pop(entry.path, None)
            self._in_flight[mid] = entry

    def send(self, topic: str, payload: bytes) -> None:
        self._counter += 1
        entry = _Entry(self.directory / f"{time.time_ns():020d}-{self._counter:06d}.msg", topic, payload)
        try:
            files = self._files()
            for old in files[: max(0, len(files) - self.limit + 1)]:
                logger.warning("outbox full: dropping the oldest report %s", old.name)
                self._forget(old)
            atomic_write_bytes(entry.path, json.dumps({"topic": topic, "payload": payload.decode()}).encode())
        except (StorageError, OSError) as exc:
            logger.warning("outbox not writable (%s): sending %s without a durable copy", exc, topic)
        failpoint("agent.report.written")
        self._hand_over(entry)

    def replay(self) -> int:
        """Publish everything a previous run left unacknowledged; returns how many."""
        held = {entry.path for entry in self._in_flight.values()} | set(self._waiting)
        count = 0
        for path in self._files():
            if path in held:
                continue
            try:
                message = json.loads(path.read_text())
                entry = _Entry(path, str(message["topic"]), str(message["payload"]).encode())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("dropping unreadable outbox entry %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            self._hand_over(entry)
            count += 1
        return count

    def delivered(self, mid: int, *, unheard: bool = False) -> None:
        """The broker acknowledged ``mid``; ``unheard``: it had no subscriber, so keep it for later."""
        entry = self._in_flight.pop(mid, None)
        if entry is None:
            return  # not an outbox message (state, chunk request) or a dropped one
        if unheard:
            logger.info("no server listened for %s: offering it again in %.0f s", entry.topic, self.unheard_retry_s)
            entry.retry_at = self.monotonic() + self.unheard_retry_s
            self._waiting[entry.path] = entry
            return
        try:
            entry.path.unlink(missing_ok=True)
        except OSError as exc:  # an outbox that was never writable holds no copy to remove
            logger.warning("could not remove %s from the outbox: %s", entry.path.name, exc)

    def retry_due(self) -> None:
        """Offer again what could not be handed over, or was heard by nobody, once its time came."""
        now = self.monotonic()
        for entry in [e for e in self._waiting.values() if e.retry_at <= now]:
            self._hand_over(entry)

    def _forget(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._waiting.pop(path, None)
        for mid in [mid for mid, entry in self._in_flight.items() if entry.path == path]:
            del self._in_flight[mid]

    def __len__(self) -> int:
        return len(self._files())
