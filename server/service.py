"""The server's loop: ingest agent reports, serve chunks, tick the rollout engine.

paho hands every message to ``inbox``; this loop drains it in batches, decodes
each payload in one place, stores the batch's events and trial telemetry with
one INSERT per table, dispatches the rest by topic kind, and commits once per
batch (a savepoint per applied message, so one bad message never spoils the batch).

One server on SQLite subscribes to everything with plain subscriptions. Several
replicas on PostgreSQL (``Subscriptions``) split events and telemetry through
MQTT 5 shared subscriptions, and only the replica holding the engine lease
(``server/lease.py``) runs the engine and subscribes to device states,
availability and chunk requests.

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
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server import ingest_counters, measurements
from server.blobs import BlobStore
from server.broker_identities import sync_broker
from server.broker_setup import BrokerLayout
from server.chunks import ChunkServer
from server.db import ConcurrentChange, Database, Session, open_database, queries, savepoint
from server.db.replica_registry import register_replica
from server.db_location import database_url
from server.ingest import apply_availability, apply_event, apply_state, apply_telemetry
from server.keys import keys_stamp, load_keys
from server.latency.retention import COMPACT_INTERVAL_S, RetentionPolicy, compact_with
from server.lease import EngineLease
from server.paths import DataDir
from server.replicas import DEFAULT_REPLICA, REPLICA_SESSION_EXPIRY_S
from server.report_batch import (
    Stored,
    StoredReports,
    apply_new_report,
    changes_more,
    is_batched_report,
    store_reports,
    unstore_report,
)
from server.rollouts import RolloutEngine
from server.roots import RootStore, chain_payload
from shared import PROTOCOL_VERSION
from shared.errors import EdgefleetError, ProtocolError, StorageError
from shared.failpoints import failpoint
from shared.messages import (
    MAX_ACK_SEQS,
    MAX_SERVER_PACKET,
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
from shared.topics import (
    ROOT_TOPIC,
    Topic,
    TopicKind,
    all_devices_filter,
    all_wants_filter,
    device_topic,
    parse_topic,
)

SHARE_GROUP = "$share/edgefleet/"

logger = logging.getLogger(__name__)

BATCH = 500
# The server acknowledges a message only once the batch holding it committed, and a broker sends a client
# at most this many unacknowledged QoS 1 messages (MQTT 5 Receive Maximum): room for the batch being
# committed and the next one arriving meanwhile. Without it the broker's own limit applies: Mosquitto's
# max_inflight_messages (100 in edgefleet's configs; tests/shared/test_mqtt_link.py sees it hold the first
# window to 100), EMQX's max_inflight (32 by default).
RECEIVE_MAXIMUM = 2 * BATCH
StoredReport = tuple[str, str, int]  # (device_id, boot_id, seq)
SESSION_EXPIRY_S = 24 * 3600  # how long the broker queues reports for a server that is down (agents resend after)
RETRY_BATCH_S = 2.0  # after the database refused a batch (locked, disk full)
IDENTITY_SYNC_S = 5.0  # how soon a device removed by a command that died before telling the broker is cut off
TICK_SHARE_FACTOR = 2.0  # the next engine tick waits at least twice as long as the last one took


def session_client_id(data_dir: DataDir, replica: str = DEFAULT_REPLICA) -> str:
    """This data directory's (and replica's) MQTT client id, created once: a restarted server resumes its
    session."""
    path = data_dir.replica_session_id(replica)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        token = path.read_text(encoding="ascii").strip()
        if token:
            return f"ef-server-{token}"
        path.unlink()
        return session_client_id(data_dir, replica)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    token = secrets.token_hex(6)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return f"ef-server-{token}"


@dataclass(frozen=True)
class Subscriptions:
    """What a server subscribes to: always, and while it holds the engine lease.

    Alone (SQLite): everything, plain, on a persistent session that outlives a day's outage. As one of
    several replicas: events and telemetry (the volume; agents resend them until acknowledged, and ingest
    is idempotent) through a shared subscription, so each report reaches one replica; states, availability
    and chunk requests only on the leader, plain, because retained messages (every device's state,
    replayed on subscribe) are not delivered to shared subscriptions, and chunks are served once per
    window across replicas only if one replica serves them. A replica's session is short: Mosquitto
    routes a shared subscription's share to a member's offline session until it expires.
    """

    always: tuple[str, ...]
    leading: tuple[str, ...]
    session_expiry_s: int

    @classmethod
    def for_mode(cls, replicated: bool) -> Subscriptions:
        reports = (all_devices_filter(TopicKind.EVENTS), all_devices_filter(TopicKind.TELEMETRY))
        devices = (all_devices_filter(TopicKind.STATE), all_devices_filter(TopicKind.AVAILABILITY), all_wants_filter())
        if not replicated:
            return cls(always=devices[:2] + reports + devices[2:], leading=(), session_expiry_s=SESSION_EXPIRY_S)
        return cls(always=tuple(SHARE_GROUP + f for f in reports), leading=devices,
                   session_expiry_s=REPLICA_SESSION_EXPIRY_S)


class ServerService:
    def __init__(
        self, data_dir: DataDir, broker: BrokerAddress, *, db: Database | None = None, tick_interval: float = 0.5,
        retention: RetentionPolicy | None = None, replica: str = DEFAULT_REPLICA, replicated: bool | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        """``replicated``: one of several replicas (shared subscriptions, leader-only duties); by default when the
        database is not SQLite (several replicas need PostgreSQL; one SQLite file allows one server)."""
        self.db = db or open_database(database_url(data_dir))
        self.replica = replica
        self.replicated = self.db.engine.dialect.name != "sqlite" if replicated is None else replicated
        self.subscriptions = Subscriptions.for_mode(self.replicated)
        self.lease = EngineLease(self.db, replica)
        self._leading = False  # what the subscriptions and duties follow (the lease's last committed renewal)
        self.broker_layout = BrokerLayout(data_dir.broker)
        self.retention = retention or RetentionPolicy()
        self.keys_dir = data_dir.keys
        self.roots = RootStore(data_dir.keys)
        self._key_stamp = keys_stamp(data_dir.keys)
        self._publish_root = True  # at start, after each connect (a broker may have lost it), on a change
        self.keys = load_keys(data_dir.keys)  # refuses a key the root does not list
        self.blobs = blobs or BlobStore(data_dir.blobs)
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.stopping = threading.Event()
        self.tick_interval = tick_interval
        self.link = MqttLink(
            broker, client_id=session_client_id(data_dir, replica), inbox=self.inbox,
            session_expiry_s=self.subscriptions.session_expiry_s, manual_ack=True, max_packet_bytes=MAX_SERVER_PACKET,
            receive_maximum=RECEIVE_MAXIMUM,
        )
        self.engine = RolloutEngine(self.db, self.keys, self._publish, blobs=self.blobs, lease=self.lease)
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
        measurements.on_hello(session, device.id)

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
        if message.device_id != topic.device_id:
            raise ProtocolError(f"chunk request of {message.device_id} published on {topic.device_id}'s topic")
        if not queries.servable_blob(session, topic.sha256):
            raise ProtocolError(f"device {message.device_id} asked for {topic.sha256}, which no release names")
        self.chunks.serve(topic.sha256, message)  # published by the loop's flush when its window closes

    # -- the root of trust ---------------------------------------------------------

    def publish_root(self) -> None:
        """The chain of every root version, retained on ef/v1/root: agents walk it from the root they trust."""
        self._publish_root = False
        try:
            chain = self.roots.chain()
            self.link.publish(ROOT_TOPIC, chain_payload(chain), retain=True)
        except EdgefleetError as exc:
            logger.error("could not publish the root of trust: %s", exc)
            return
        logger.info("published the root of trust v%d", len(chain))

    def check_root(self) -> None:
        """After 'edgefleet keys rotate' or 'revoke' wrote a new root or key: sign with the keys it lists (a
        rotated director key), and publish it. Two stats per tick while nothing changed."""
        try:
            stamp = keys_stamp(self.keys_dir)
        except OSError as exc:
            logger.error("cannot read %s: %s", self.keys_dir, exc)
            return
        if stamp != self._key_stamp:
            self._key_stamp = stamp
            try:
                keys = load_keys(self.keys_dir)
            except EdgefleetError as exc:  # e.g. a rotation half done: keep signing with what we have
                logger.error("the root of trust changed, but its keys cannot be used (%s): still signing as before",
                             exc)
            else:
                self.keys = self.engine.keys = keys
                self._publish_root = True
        if self._publish_root and self._leading:
            self.publish_root()

    # -- loop ------------------------------------------------------------------

    def handle_batch(self, items: list[Any]) -> None:
        """Apply a batch in one transaction, then acknowledge its messages to the broker.

        Every payload is decoded first; a malformed one is dropped before anything is written. The
        batch's events and trial telemetry are stored with one INSERT per table (``server/report_batch.py``);
        then, in arrival order, each other message goes to its handler and each new report is applied,
        each in a savepoint, so one that raises is dropped (and a report of it taken back) alone."""
        kinds: set[str] = set()  # for the crash tests' failpoints
        stored: list[StoredReport] = []
        outcomes: list[tuple[str, str]] = []  # (topic kind, result) for /metrics, counted once committed
        decoded: list[tuple[Inbound, Topic, Any]] = []
        for item in items:
            if isinstance(item, LinkUp):
                self._publish_root = True  # by the next tick: a restarted broker may have lost it
                logger.debug("connected to %s (%s session)", self.link.broker.url(),
                             "resumed" if item.session_present else "new")
            elif isinstance(item, LinkDown):
                logger.debug("disconnected from broker: %s", item.reason)  # the link said so
            else:
                assert isinstance(item, Inbound)
                message = self._decode(item, outcomes)
                if message is not None:
                    decoded.append(message)
        with self.db.session() as session:
            # Every device the batch names, in one query: later lookups find them in the session.
            devices = queries.live_devices(session, {t.device_id for _, t, _ in decoded if t.device_id is not None})
            batched = [i for i, (_, topic, message) in enumerate(decoded) if is_batched_report(topic.kind, message)]
            reports = store_reports(session, [decoded[i][2] for i in batched], devices)
            report_outcome = dict(zip(batched, reports.outcomes, strict=True))
            for index, (item, topic, message) in enumerate(decoded):
                kind = topic.kind.value
                try:
                    if index in report_outcome:
                        result, report = self._apply_report(session, reports, report_outcome[index], message)
                    else:
                        seen = ingest_counters.already_stored(session, topic.kind, message)
                        with savepoint(session):
                            report = self._handlers[topic.kind](session, topic, message)
                        result = ingest_counters.result_of(topic.kind, seen, report)
                    kinds.add(kind)
                    outcomes.append((kind, result))
                    if report is not None:
                        stored.append(report)
                except ConcurrentChange:
                    raise  # another replica changed what this batch read: the whole batch again, shortly
                except ProtocolError as exc:
                    outcomes.append((kind, ingest_counters.MALFORMED))
                    logger.warning("dropped a malformed message on %s: %s", item.topic, exc)
                except EdgefleetError as exc:
                    outcomes.append((kind, ingest_counters.DROPPED))
                    logger.error("could not apply the message on %s: %s", item.topic, exc)
                except Exception:  # a bug; one device's message must still not stop the fleet's server
                    outcomes.append((kind, ingest_counters.DROPPED))
                    logger.exception("unexpected error applying the message on %s; dropped", item.topic)
            for kind in sorted(kinds):
                failpoint(f"server.applied.{kind}")  # applied, not committed
        ingest_counters.INGEST.count(outcomes)
        for kind in sorted(kinds):
            failpoint(f"server.committed.{kind}")  # committed, not acknowledged
        self._acknowledge_reports(stored)
        self.link.ack_all([item for item in items if isinstance(item, Inbound)])  # committed: the broker may forget them

    def _decode(self, item: Inbound, outcomes: list[tuple[str, str]]) -> tuple[Inbound, Topic, Any] | None:
        """The message of ``item`` with its topic, if the server consumes it and it is well-formed; None
        otherwise (counted as malformed and logged; None too for a cleared retained message)."""
        kind = ingest_counters.UNKNOWN_KIND
        try:
            topic = parse_topic(item.topic)
            kind = topic.kind.value
            if topic.kind not in self._handlers:
                raise ProtocolError(f"the server does not consume {topic.kind.value}")
            if not item.payload:
                return None  # a cleared retained message
            message = decode_payload(topic.kind, item.payload)
            if is_batched_report(topic.kind, message) and message.device_id != topic.device_id:
                raise ProtocolError(f"{topic.kind.value} of {message.device_id} published on {topic.device_id}'s topic")
        except ProtocolError as exc:
            outcomes.append((kind, ingest_counters.MALFORMED))
            logger.warning("dropped a malformed message on %s: %s", item.topic, exc)
            return None
        except Exception:  # a bug in a decoder; the rest of the batch still goes in
            outcomes.append((kind, ingest_counters.DROPPED))
            logger.exception("unexpected error decoding the message on %s; dropped", item.topic)
            return None
        return item, topic, message

    @staticmethod
    def _apply_report(session: Session, reports: StoredReports, outcome: Stored,
                      message: Event | Telemetry) -> tuple[str, StoredReport | None]:
        """The /metrics result of a report ``store_reports`` handled, and its key if the agent may forget it."""
        key = (message.device_id, message.boot_id, message.seq)
        if outcome is Stored.UNKNOWN_DEVICE:
            return ingest_counters.DROPPED, None
        if outcome is Stored.DUPLICATE:
            return ingest_counters.DUPLICATE, key
        if not changes_more(message):
            apply_new_report(session, reports.devices[message.device_id], message)  # at most a log line
            return ingest_counters.STORED, key
        try:
            with savepoint(session):
                apply_new_report(session, reports.devices[message.device_id], message)
        except Exception:
            unstore_report(session, message)  # unacknowledged: its redelivery is applied anew
            raise
        return ingest_counters.STORED, key

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

    def compact_latency(self) -> None:
        """Downsample old serving reports and drop expired rollups (``server/latency/retention.py``)."""
        try:
            compact_with(self.db, time.time(), self.retention)
        except EdgefleetError as exc:  # tried again at the next interval
            logger.error("latency retention failed: %s", exc)

    def sync_broker_identities(self) -> None:
        """Make the broker's password file and ACL say what the database says (``server/broker_identities.py``)."""
        try:
            if sync_broker(self.db, self.broker_layout):
                logger.info("broker identities brought up to date with the registry")
        except EdgefleetError as exc:  # tried again at the next interval
            logger.error("could not update the broker's identities: %s", exc)

    def next_tick_in(self, tick_s: float) -> float:
        """Seconds until the next engine tick. A tick reads every device and deployment: with thousands of them
        it takes a good part of a second, and back to back ticks would leave the reports waiting. So the loop
        gives the engine at most a third of its time, and ticks often enough to keep the lease."""
        return min(max(self.tick_interval, TICK_SHARE_FACTOR * tick_s), self.lease.ttl_s / 3)

    def _wait_s(self, next_tick: float) -> float:
        """How long the loop may wait for messages: until the next tick or chunk window closes."""
        due = self.chunks.next_due()
        wake = next_tick if due is None else min(next_tick, due)
        return min(self.tick_interval, max(0.0, wake - time.monotonic()))

    def follow_leadership(self) -> bool:
        """Subscribe to what only the leader consumes when this replica took the lease, unsubscribe when it
        lost it; returns whether it leads."""
        leading = self.lease.held
        if leading != self._leading:
            self._leading = leading
            for topic_filter in self.subscriptions.leading:
                if leading:
                    self.link.subscribe(topic_filter)  # a device's retained state arrives at once
                else:
                    self.link.unsubscribe(topic_filter)
            if leading:
                self._publish_root = True
        return leading

    def run(self) -> None:
        # One server: plain subscriptions, not shared ones. Mosquitto keeps routing a shared group's share
        # to a member's offline session (so a session left behind by an old data directory would swallow
        # half the reports until it expires): replicas keep short sessions (Subscriptions). It does not
        # restore a persistent session's shared subscriptions after a broker restart either: MqttLink
        # subscribes again on every connect.
        register_replica(self.db, self.replica, socket.gethostname(), os.getpid())
        self.sync_broker_identities()  # before connecting: the broker must know this replica's identity
        if not self.replicated:
            self.lease.free_dead_holder()  # alone on SQLite (the CLI's single-server lock sees to it)
        for topic_filter in self.subscriptions.always:
            self.link.subscribe(topic_filter)
        self.link.start()
        logger.info("server%s running against %s", f" replica {self.replica}" if self.replicated else "",
                    self.link.broker.url())
        next_tick = 0.0
        next_compaction = time.monotonic()  # at start, then every COMPACT_INTERVAL_S
        next_identity_sync = time.monotonic()  # at start, then every IDENTITY_SYNC_S
        unstored: list[Any] = []
        try:
            while not self.stopping.is_set():
                items = unstored or self._drain(timeout=self._wait_s(next_tick))
                unstored = []
                if items:
                    try:
                        self.handle_batch(items)
                    except ConcurrentChange as exc:  # another replica wrote the same rows: expected, not an error
                        logger.info("a batch of %d messages met a concurrent change (retrying): %s", len(items), exc)
                        unstored = items
                    except EdgefleetError as exc:  # unacknowledged: kept, and tried again shortly
                        logger.error("could not store a batch of %d messages (retrying): %s", len(items), exc)
                        unstored = items
                        self.stopping.wait(RETRY_BATCH_S)
                self.chunks.flush()
                if time.monotonic() >= next_tick:
                    tick_started = time.monotonic()
                    self.check_root()
                    try:
                        self.engine.tick()  # renews the lease, or finds another replica holds it
                    except ConcurrentChange as exc:  # a replica's ingest wrote a row this tick read: next tick
                        logger.info("rollout engine tick met a concurrent change (again at the next tick): %s", exc)
                    except EdgefleetError as exc:
                        logger.error("rollout engine tick failed: %s", exc)
                    was_leading = self._leading
                    if self.follow_leadership() and not was_leading:
                        self.check_root()  # publish the root now, not a tick later
                    if self._leading:
                        self.send_measurements()
                    next_tick = time.monotonic() + self.next_tick_in(time.monotonic() - tick_started)
                if not self._leading:
                    continue
                if time.monotonic() >= next_compaction:
                    self.compact_latency()
                    next_compaction = time.monotonic() + COMPACT_INTERVAL_S
                if time.monotonic() >= next_identity_sync:
                    self.sync_broker_identities()
                    next_identity_sync = time.monotonic() + IDENTITY_SYNC_S
        finally:
            self.link.stop()
            try:
                self.lease.release()  # another replica takes over at its next tick
            except EdgefleetError as exc:  # it expires by itself
                logger.warning("could not release the engine lease: %s", exc)

    def send_measurements(self) -> None:
        """Benchmark-only trials a build waits for (``model build --measure-on``): sent until answered."""
        try:
            with self.db.session() as session:
                measurements.send_due(session, lambda topic, payload: self._publish(topic, payload, False))
        except EdgefleetError as exc:
            logger.error("could not send the open measurements (at the next tick): %s", exc)

    def stop(self) -> None:
        self.stopping.set()
