"""The server's loop: ingest agent reports, serve chunks, tick the rollout engine.

paho hands every message to ``inbox``; this loop drains it in batches, decodes
each payload in one place, dispatches by topic kind, and commits once per
batch (a savepoint per message, so one bad message never spoils the batch).
Every subscription is a plain one (see ``run`` for why not MQTT 5 shared
subscriptions yet).

No report is lost to a server restart: the server keeps a persistent MQTT
session under a stable client id, so the broker queues what agents publish
while it is down, and it acknowledges each message to the broker only after
the batch that applied it committed, so a crash in between has the broker
deliver it again (ingest is idempotent). After the commit it also tells each
agent which of its reports it stored (``ReportAck``): agents keep every
report until then and send it again otherwise, so even a queue the broker
lost (an expired session, a broker restarted without its data) loses no
report, and every device's retained state, re-sent on each subscribe, and
its hello settle the open deployments at once.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from server.blobs import BlobStore
from server.chunks import ChunkServer
from server.db import Database, Session, open_database, queries
from server.ingest import apply_availability, apply_event, apply_state, apply_telemetry
from server.keys import load_keys
from server.paths import DataDir
from server.rollouts import RolloutEngine
from shared import PROTOCOL_VERSION
from shared.errors import EdgefleetError, ProtocolError, StorageError
from shared.failpoints import failpoint
from shared.messages import (
    MAX_ACK_SEQS,
    Availability,
    ChunkRequest,
    DeviceState,
    Event,
    ReportAck,
    Telemetry,
    decode_payload,
    encode_payload,
)
from shared.mqtt import BrokerAddress, Inbound, LinkDown, LinkUp, MqttLink
from shared.topics import Topic, TopicKind, all_devices_filter, all_wants_filter, device_topic, parse_topic

logger = logging.getLogger(__name__)

BATCH = 500
StoredReport = tuple[str, str, int]  # (device_id, boot_id, seq)
SESSION_EXPIRY_S = 24 * 3600  # how long the broker queues reports for a server that is down (agents resend after)
RETRY_BATCH_S = 2.0  # after the database refused a batch (locked, disk full)


def session_client_id(data_dir: DataDir) -> str:
    """This data directory's MQTT client id, created once: a restarted server resumes its session."""
    path = data_dir.session_id
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        token = path.read_text(encoding="ascii").strip()
        if token:
            return f"ef-server-{token}"
        path.unlink()
        return session_client_id(data_dir)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    token = secrets.token_hex(6)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return f"ef-server-{token}"


class ServerService:
    def __init__(
        self, data_dir: DataDir, broker: BrokerAddress, *, db: Database | None = None, tick_interval: float = 0.5
    ) -> None:
        self.db = db or open_database(data_dir.database_url())
        self.keys = load_keys(data_dir.keys)
        self.blobs = BlobStore(data_dir.blobs)
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.stopping = threading.Event()
        self.tick_interval = tick_interval
        self.link = MqttLink(
            broker, client_id=session_client_id(data_dir), inbox=self.inbox, session_expiry_s=SESSION_EXPIRY_S,
            manual_ack=True,
        )
        self.engine = RolloutEngine(self.db, self.keys, self._publish, blobs=self.blobs)
        self.chunks = ChunkServer(self.blobs, self._publish_chunk)
        # Each handler returns the (device, boot, seq) of a report it holds for good, if any: the
        # agent keeps a report until the server acknowledges it, after the commit.
        self._handlers: dict[TopicKind, Callable[[Session, Topic, Any], StoredReport | None]] = {
            TopicKind.STATE: self._on_state,
            TopicKind.AVAILABILITY: self._on_availability,
            TopicKind.EVENTS: self._on_event,
            TopicKind.TELEMETRY: self._on_telemetry,
            TopicKind.WANT: self._on_want,
        }

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.link.publish(topic, payload, retain=retain)

    def _publish_chunk(self, topic: str, payload: bytes, retain: bool) -> None:
        # Not kept while disconnected (an artifact could fill memory): the agents ask again.
        self.link.publish(topic, payload, retain=retain, when_offline="drop")

    # -- handlers ------------------------------------------------------------

    def _on_state(self, session: Session, topic: Topic, message: DeviceState) -> None:
        if message.device_id != topic.device_id:
            raise ProtocolError(f"state of {message.device_id} published on {topic.device_id}'s topic")
        device = apply_state(session, message)
        if device is None or not message.hello:
            return
        self.engine.on_hello(session, device, message.directive_seq)  # published by the next tick

    def _on_availability(self, session: Session, topic: Topic, message: Availability) -> None:
        assert topic.device_id is not None
        apply_availability(session, topic.device_id, message)

    def _on_event(self, session: Session, topic: Topic, message: Event) -> StoredReport | None:
        if message.device_id != topic.device_id:
            raise ProtocolError(f"event of {message.device_id} published on {topic.device_id}'s topic")
        return (message.device_id, message.boot_id, message.seq) if apply_event(session, message) else None

    def _on_telemetry(self, session: Session, topic: Topic, message: Telemetry) -> StoredReport | None:
        if message.device_id != topic.device_id:
            raise ProtocolError(f"telemetry of {message.device_id} published on {topic.device_id}'s topic")
        return (message.device_id, message.boot_id, message.seq) if apply_telemetry(session, message) else None

    def _on_want(self, session: Session, topic: Topic, message: ChunkRequest) -> None:
        assert topic.sha256 is not None
        if not queries.servable_blob(session, topic.sha256):
            raise ProtocolError(f"device {message.device_id} asked for {topic.sha256}, which no release names")
        self.chunks.serve(topic.sha256, message)  # published by the loop's flush when its window closes

    # -- loop ------------------------------------------------------------------

    def handle_batch(self, items: list[Any]) -> None:
        """Apply a batch in one transaction, then acknowledge its messages to the broker."""
        kinds: set[str] = set()  # for the crash tests' failpoints
        stored: list[StoredReport] = []
        with self.db.session() as session:
            for item in items:
                if isinstance(item, LinkUp):
                    logger.debug("connected to %s (%s session)", self.link.broker.url(),
                                 "resumed" if item.session_present else "new")
                    continue
                if isinstance(item, LinkDown):
                    logger.debug("disconnected from broker: %s", item.reason)  # the link said so
                    continue
                assert isinstance(item, Inbound)
                try:
                    topic = parse_topic(item.topic)
                    handler = self._handlers.get(topic.kind)
                    if handler is None:
                        raise ProtocolError(f"the server does not consume {topic.kind.value}")
                    if not item.payload:
                        continue  # a cleared retained message
                    message = decode_payload(topic.kind, item.payload)
                    with session.begin_nested():
                        report = handler(session, topic, message)
                    kinds.add(topic.kind.value)
                    if report is not None:
                        stored.append(report)
                except ProtocolError as exc:
                    logger.warning("dropped a malformed message on %s: %s", item.topic, exc)
                except EdgefleetError as exc:
                    logger.error("could not apply the message on %s: %s", item.topic, exc)
                except Exception:  # a bug; one device's message must still not stop the fleet's server
                    logger.exception("unexpected error applying the message on %s; dropped", item.topic)
            for kind in sorted(kinds):
                failpoint(f"server.applied.{kind}")  # applied, not committed
        for kind in sorted(kinds):
            failpoint(f"server.committed.{kind}")  # committed, not acknowledged
        self._acknowledge_reports(stored)
        for item in items:  # committed: now the broker may forget them
            if isinstance(item, Inbound):
                self.link.ack(item)

    def _acknowledge_reports(self, stored: list[StoredReport]) -> None:
        """Tell each agent which of its reports are stored: one message per device and boot."""
        by_boot: dict[tuple[str, str], list[int]] = defaultdict(list)
        for device_id, boot_id, seq in stored:
            by_boot[(device_id, boot_id)].append(seq)
        for (device_id, boot_id), seqs in by_boot.items():
            for start in range(0, len(seqs), MAX_ACK_SEQS):
                ack = ReportAck(v=PROTOCOL_VERSION, boot_id=boot_id, seqs=tuple(seqs[start : start + MAX_ACK_SEQS]))
                try:
                    self.link.publish(device_topic(TopicKind.ACK, device_id), encode_payload(ack))
                except EdgefleetError as exc:  # the agent sends the reports again and asks for this anew
                    logger.warning("could not acknowledge reports of %s: %s", device_id, exc)

    def _drain(self, timeout: float) -> list[Any]:
        try:
            items = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(items) < BATCH:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return items

    def _wait_s(self, next_tick: float) -> float:
        """How long the loop may wait for messages: until the next tick or chunk window closes."""
        due = self.chunks.next_due()
        wake = next_tick if due is None else min(next_tick, due)
        return min(self.tick_interval, max(0.0, wake - time.monotonic()))

    def run(self) -> None:
        # Plain subscriptions, not MQTT 5 shared ones, while one server consumes everything: Mosquitto
        # keeps routing a shared group's share to a member's offline session (so a session left behind
        # by an old data directory would swallow half the reports until it expires), and it does not
        # restore a persistent session's shared subscriptions after a broker restart (reports published
        # before the server reconnects would find no subscriber). Several replicas need both solved.
        for kind in (TopicKind.STATE, TopicKind.AVAILABILITY, TopicKind.EVENTS, TopicKind.TELEMETRY):
            self.link.subscribe(all_devices_filter(kind))
        self.link.subscribe(all_wants_filter())
        self.link.start()
        logger.info("server running against %s", self.link.broker.url())
        next_tick = 0.0
        unstored: list[Any] = []
        try:
            while not self.stopping.is_set():
                items = unstored or self._drain(timeout=self._wait_s(next_tick))
                unstored = []
                if items:
                    try:
                        self.handle_batch(items)
                    except EdgefleetError as exc:  # unacknowledged: kept, and tried again shortly
                        logger.error("could not store a batch of %d messages (retrying): %s", len(items), exc)
                        unstored = items
                        self.stopping.wait(RETRY_BATCH_S)
                self.chunks.flush()
                if time.monotonic() >= next_tick:
                    try:
                        self.engine.tick()
                    except EdgefleetError as exc:
                        logger.error("rollout engine tick failed: %s", exc)
                    next_tick = time.monotonic() + self.tick_interval
        finally:
            self.link.stop()

    def stop(self) -> None:
        self.stopping.set()
