"""How many agent messages the server's loop took in, by topic kind and result, for ``/metrics``.

The loop counts each message once its batch committed (a batch the database refused is counted when it
is applied again), so the numbers are what the registry holds, not what merely arrived:

- ``stored``: applied (a report kept for good, or a state, availability or chunk request acted on);
- ``duplicate``: a report already stored (a QoS 1 redelivery, or the agent sending it again before its ack);
- ``dropped``: well-formed, not applied (an unknown or removed device, or the database refused it);
- ``malformed``: could not be parsed or did not fit its topic.

Counters are process-wide and only grow, as Prometheus counters must; labels are bounded
(the topic kinds the server consumes times these four results).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from server.db import Session, latency_queries, queries
from shared.messages import Event, Telemetry
from shared.topics import TopicKind

STORED, DUPLICATE, DROPPED, MALFORMED = "stored", "duplicate", "dropped", "malformed"
RESULTS = (STORED, DUPLICATE, DROPPED, MALFORMED)
UNKNOWN_KIND = "unknown"  # a topic the server could not parse


class IngestCounters:
    """Monotonic counts by (topic kind, result); safe to read from the HTTP thread while the loop counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def count(self, outcomes: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            for kind, result in outcomes:
                if result not in RESULTS:
                    raise ValueError(f"unknown ingest result {result!r}")
                self._counts[kind, result] = self._counts.get((kind, result), 0) + 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


INGEST = IngestCounters()


def already_stored(session: Session, kind: TopicKind, message: Any) -> bool:
    """True when ``message`` is an event or telemetry report the registry holds already."""
    if kind is TopicKind.EVENTS and isinstance(message, Event):
        return queries.event_seen(session, message.device_id, message.boot_id, message.seq)
    if kind is TopicKind.TELEMETRY and isinstance(message, Telemetry):
        if message.kind == "serving":  # kept by the latency store, not in the telemetry table
            return latency_queries.serving_report_seen(session, message.device_id, message.boot_id, message.seq)
        return queries.telemetry_seen(session, message.device_id, message.boot_id, message.seq)
    return False


def result_of(kind: TopicKind, seen_before: bool, report: object) -> str:
    """The result of a message its handler applied without raising: ``report`` is what the handler returned."""
    if seen_before:
        return DUPLICATE
    if kind in (TopicKind.EVENTS, TopicKind.TELEMETRY) and report is None:
        return DROPPED  # from an unknown or removed device
    return STORED
