"""A bounded on-disk outbox for the reports that must not be lost.

Events and telemetry are written here before they are published, and deleted
only when the *server* acknowledges that it stored them (a ``ReportAck``
naming their ``(boot_id, seq)``), not when the broker took them: a broker's
acknowledgement only says the message reached the broker, which may then
queue it for a server session nobody reads any more, route it to no one, or
lose it in a crash. Until the server's acknowledgement arrives, a report is
sent again now and then, with back-off; the server's ingest is idempotent by
``(device, boot_id, seq)``, so the copies cost nothing but bytes. After a
restart the agent sends whatever is left.

While the link is down paho keeps what was handed to it and sends it on the
next connection, so nothing is re-sent while offline, and the timers start
again when the link comes back.
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

Publish = Callable[[str, bytes], object]

ACK_TIMEOUT_S = 30.0  # the first wait for the server's acknowledgement
MAX_WAIT_S = 600.0  # back-off doubles up to this

ReportKey = tuple[str, int]  # (boot_id, seq)


@dataclass
class _Entry:
    path: Path
    topic: str
    payload: bytes
    wait_s: float
    resend_at: float = 0.0
    kind: str = ""  # what the report is, for ``waiting`` (e.g. "serving"); "" when untold


def report_key(payload: bytes) -> ReportKey:
    """The ``(boot_id, seq)`` every report carries; the server acknowledges it by that."""
    body = json.loads(payload)
    return str(body["boot_id"]), int(body["seq"])


class Outbox:
    def __init__(
        self,
        directory: Path,
        publish: Publish,
        *,
        limit: int = 1000,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        max_wait_s: float = MAX_WAIT_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.publish = publish
        self.limit = limit
        self.ack_timeout_s = ack_timeout_s
        self.max_wait_s = max_wait_s
        self.monotonic = monotonic
        self._entries: dict[ReportKey, _Entry] = {}
        self._counter = 0

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("*.msg")) if self.directory.exists() else []

    def _hand_over(self, entry: _Entry) -> None:
        entry.resend_at = self.monotonic() + entry.wait_s
        try:
            self.publish(entry.topic, entry.payload)
        except EdgefleetError as exc:
            logger.warning("could not publish %s yet (kept in the outbox): %s", entry.topic, exc)

    def send(self, topic: str, payload: bytes, *, kind: str = "") -> None:
        """Keep a report (it must carry boot_id and seq) and publish it; ``kind`` tags it for ``waiting``."""
        key = report_key(payload)
        self._counter += 1
        entry = _Entry(self.directory / f"{time.time_ns():020d}-{self._counter:06d}.msg", topic, payload,
                       self.ack_timeout_s, kind=kind)
        try:
            files = self._files()
            for old in files[: max(0, len(files) - self.limit + 1)]:
                logger.warning("outbox full: dropping the oldest report %s", old.name)
                self._drop(old)
            stored = {"topic": topic, "payload": payload.decode(), **({"kind": kind} if kind else {})}
            atomic_write_bytes(entry.path, json.dumps(stored).encode())
        except (StorageError, OSError) as exc:
            logger.warning("outbox not writable (%s): sending %s without a durable copy", exc, topic)
        failpoint("agent.report.written")
        self._entries[key] = entry
        self._hand_over(entry)

    def replay(self) -> int:
        """Publish everything a previous run left unacknowledged; returns how many."""
        held = {entry.path for entry in self._entries.values()}
        count = 0
        for path in self._files():
            if path in held:
                continue
            try:
                message = json.loads(path.read_text())
                payload = str(message["payload"]).encode()
                entry = _Entry(path, str(message["topic"]), payload, self.ack_timeout_s,
                               kind=str(message.get("kind", "")))
                key = report_key(payload)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("dropping unreadable outbox entry %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            self._entries[key] = entry
            self._hand_over(entry)
            count += 1
        return count

    def acknowledge(self, boot_id: str, seqs: tuple[int, ...]) -> None:
        """The server stored these reports: forget them."""
        for seq in seqs:
            entry = self._entries.pop((boot_id, seq), None)
            if entry is not None:
                self._remove(entry.path)

    def link_up(self) -> None:
        """A new connection: paho sends what it held, so every timer starts again from now."""
        now = self.monotonic()
        for entry in self._entries.values():
            entry.resend_at = now + entry.wait_s

    def retry_due(self, *, connected: bool) -> None:
        """Send again what the server has not acknowledged in time, waiting longer each time."""
        if not connected:
            return  # paho holds what was handed over, and the link coming back restarts the timers
        now = self.monotonic()
        for entry in [e for e in self._entries.values() if e.resend_at <= now]:
            logger.info("no acknowledgement for a report on %s after %.0f s: sending it again", entry.topic,
                        entry.wait_s)
            entry.wait_s = min(entry.wait_s * 2, self.max_wait_s)
            self._hand_over(entry)

    def _drop(self, path: Path) -> None:
        self._remove(path)
        for key in [key for key, entry in self._entries.items() if entry.path == path]:
            del self._entries[key]

    def _remove(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # an outbox that was never writable holds no copy to remove
            logger.warning("could not remove %s from the outbox: %s", path.name, exc)

    def waiting(self, kind: str) -> int:
        """How many reports of ``kind`` wait for the server's acknowledgement (this run's and replayed)."""
        return sum(1 for entry in self._entries.values() if entry.kind == kind)

    def __len__(self) -> int:
        return len(self._files())
