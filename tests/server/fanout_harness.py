"""A wave of agent-like MQTT clients downloading one artifact from a real ``ServerService``.

Shared by ``tests/server/test_fanout.py`` and ``bench/fanout.py``, so the test
and the benchmark exercise the same thing. Each client downloads the way
``agent/updater.py`` does: subscribe to the artifact's chunk filter, publish
one want for every chunk it lacks, check each chunk's sha256, and ask again
for what is still missing only after the agent's request interval. Unlike the
agent, a client waits for its SUBACK before it asks, so the harness does not
even rely on the broker applying one client's packets in order.

The clients' paho callbacks only hand off to one queue; ``download_wave``'s
single loop joins clients on schedule, asks, re-asks and assembles.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import DownloadSection
from server.db.models import Artifact, Model, ModelVersion, Release
from server.service import ServerService
from server.setup import Workspace
from shared import PROTOCOL_VERSION
from shared.messages import DEFAULT_CHUNK_SIZE, ChunkRequest, encode_payload
from shared.mqtt import BrokerAddress
from shared.topics import TopicKind, chunk_filter, parse_topic, want_topic

REQUEST_INTERVAL_S = DownloadSection().request_interval_seconds  # the agent's default re-ask interval


# -- the server side ---------------------------------------------------------------------------


def add_servable_blob(workspace: Workspace, data: bytes, name: str = "fanout") -> str:
    """Store ``data`` and insert the rows that make it a released model file; returns its sha256.

    The chunk server serves only files a release names (``queries.servable_blob``);
    the manifest itself is not needed to serve chunks, so none is signed here.
    """
    sha256 = workspace.blobs.put(data)
    with workspace.db.session() as session:
        model = Model(name=name)
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_id=model.id, version=1, source_sha256=sha256, source_name=f"{name}.tflite", eval_sha256=sha256,
            eval_samples=0, num_classes=1, reference_accuracy=1.0,
        )
        session.add(version)
        session.flush()
        artifact = Artifact(
            model_version_id=version.id, profile_name="x86-64", quantization="float32", sha256=sha256,
            size_bytes=len(data), host_accuracy=1.0,
        )
        session.add(artifact)
        session.flush()
        session.add(Release(artifact_id=artifact.id, manifest={}, manifest_sha256="", model_sha256=sha256))
    return sha256


class ChunkPublishCounter:
    """Wraps the server link's ``publish``: how many times each chunk went to the broker."""

    def __init__(self, publish: Callable[..., Any]) -> None:
        self._publish = publish
        self.copies: Counter[tuple[str, int]] = Counter()

    def __call__(self, topic: str, payload: bytes, **options: Any) -> Any:
        parsed = parse_topic(topic)
        if parsed.kind is TopicKind.CHUNK:
            assert parsed.sha256 is not None and parsed.chunk_index is not None
            self.copies[(parsed.sha256, parsed.chunk_index)] += 1
        return self._publish(topic, payload, **options)

    def per_chunk(self, sha256: str, count: int) -> list[int]:
        return [self.copies[(sha256, i)] for i in range(count)]


@contextmanager
def running_server(
    workspace: Workspace, broker: BrokerAddress, *, window_s: float | None = None
) -> Iterator[tuple[ServerService, ChunkPublishCounter]]:
    """The real ``ServerService`` loop in a thread, its chunk publishes counted (``window_s``: not the default)."""
    service = ServerService(workspace.data_dir, broker, db=workspace.db)
    if window_s is not None:
        service.chunks.window_s = window_s
    counter = ChunkPublishCounter(service.link.publish)
    service.link.publish = counter  # type: ignore[method-assign]
    thread = threading.Thread(target=service.run, name="server-loop", daemon=True)
    thread.start()
    try:
        # run() subscribes inside paho's on_connect, before it reports connected; clients
        # connect and subscribe after this, so the server's subscriptions are in place first.
        if not service.link.wait_connected(10):
            raise TimeoutError(f"the server did not connect to {broker.url()}")
        yield service, counter
    finally:
        service.stop()
        thread.join(10)


def wait_until_flushed(service: ServerService, timeout_s: float = 10.0) -> None:
    """Wait until the server has no open chunk window (a late want may still be due after every client is done)."""
    deadline = time.monotonic() + timeout_s
    while service.chunks.pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service.chunks.pending} chunk windows still open after {timeout_s} s")
        time.sleep(0.01)


# -- the agent-like clients --------------------------------------------------------------------


@dataclass(frozen=True)
class _Connected:
    name: str
    failure: str | None


@dataclass(frozen=True)
class _Subscribed:
    name: str
    failure: str | None


@dataclass(frozen=True)
class _ChunkArrived:
    name: str
    topic: str
    payload: bytes
    at: float


@dataclass(frozen=True)
class Download:
    """One client's download: ``seconds`` from subscribing to holding every chunk (None if it never did)."""

    name: str
    joined_at: float
    first_chunk_at: float | None
    seconds: float | None
    requests: int
    sha256_ok: bool


def missing_ranges(held: Container[int], count: int) -> tuple[tuple[int, int], ...]:
    """The [start, end) runs of chunk indices not in ``held``."""
    ranges: list[tuple[int, int]] = []
    start: int | None = None
    for index in range(count + 1):
        missing = index < count and index not in held
        if missing and start is None:
            start = index
        elif not missing and start is not None:
            ranges.append((start, index))
            start = None
    return tuple(ranges)


class AgentLikeClient:
    """One device downloading one artifact; driven by ``download_wave``'s loop."""

    def __init__(
        self, name: str, broker: BrokerAddress, sha256: str, chunk_digests: list[str], inbox: queue.Queue[Any]
    ) -> None:
        self.name = name
        self.broker = broker
        self.sha256 = sha256
        self.digests = chunk_digests
        self.held: dict[int, bytes] = {}
        self.requests = 0
        self.joined_at: float | None = None
        self.last_request_at: float | None = None
        self.first_chunk_at: float | None = None
        self.done_at: float | None = None
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        self._client.on_connect = lambda c, u, f, rc, p: inbox.put(_Connected(name, str(rc) if rc.is_failure else None))
        self._client.on_subscribe = lambda c, u, mid, rcs, p: inbox.put(
            _Subscribed(name, next((str(rc) for rc in rcs if rc.is_failure), None))
        )
        self._client.on_message = lambda c, u, m: inbox.put(_ChunkArrived(name, m.topic, bytes(m.payload), time.monotonic()))

    @property
    def complete(self) -> bool:
        return len(self.held) == len(self.digests)

    def connect(self) -> None:
        self._client.connect(self.broker.host, self.broker.port, keepalive=30, clean_start=True)
        self._client.loop_start()

    def join(self, now: float) -> None:
        self.joined_at = now
        self._client.subscribe(chunk_filter(self.sha256), qos=1)

    def ask(self, now: float) -> None:
        request = ChunkRequest(v=PROTOCOL_VERSION, device_id=self.name, ranges=missing_ranges(self.held, len(self.digests)))
        self._client.publish(want_topic(self.name, self.sha256), encode_payload(request), qos=1)
        self.requests += 1
        self.last_request_at = now

    def reask_due(self) -> float | None:
        """When this client asks again for what it still misses, as the agent's ``tick`` would."""
        if self.complete or self.last_request_at is None:
            return None
        return self.last_request_at + REQUEST_INTERVAL_S

    def accept(self, index: int, payload: bytes, at: float) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = at
        if index in self.held or index >= len(self.digests):
            return  # a second window's copy, meant for a later joiner
        if hashlib.sha256(payload).hexdigest() != self.digests[index]:
            raise AssertionError(f"{self.name}: chunk {index} does not match its sha256")
        self.held[index] = payload
        if self.complete:
            self.done_at = at
            self._client.unsubscribe(chunk_filter(self.sha256))

    def result(self) -> Download:
        assert self.joined_at is not None
        whole = b"".join(self.held[i] for i in sorted(self.held))
        return Download(
            name=self.name,
            joined_at=self.joined_at,
            first_chunk_at=self.first_chunk_at,
            seconds=None if self.done_at is None else self.done_at - self.joined_at,
            requests=self.requests,
            sha256_ok=self.complete and hashlib.sha256(whole).hexdigest() == self.sha256,
        )

    def disconnect(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def chunk_digests(data: bytes) -> list[str]:
    return [
        hashlib.sha256(data[i : i + DEFAULT_CHUNK_SIZE]).hexdigest()
        for i in range(0, max(len(data), 1), DEFAULT_CHUNK_SIZE)
    ]


def download_wave(
    broker: BrokerAddress, data: bytes, join_offsets: Sequence[float], *, timeout_s: float = 60.0
) -> list[Download]:
    """Clients that each start downloading ``data`` ``join_offsets[i]`` seconds into the wave."""
    inbox: queue.Queue[Any] = queue.Queue()
    sha256, digests = hashlib.sha256(data).hexdigest(), chunk_digests(data)
    clients = {
        f"fanout-{i:03d}": AgentLikeClient(f"fanout-{i:03d}", broker, sha256, digests, inbox)
        for i in range(len(join_offsets))
    }
    try:
        for client in clients.values():
            client.connect()
        _await_connections(inbox, len(clients), time.monotonic() + 10)
        start = time.monotonic()
        joins = deque(sorted(zip(join_offsets, clients.values()), key=lambda pair: pair[0]))
        _drive(inbox, clients, joins, start, deadline=start + timeout_s)
    finally:
        for client in clients.values():
            client.disconnect()
    return [client.result() for client in clients.values() if client.joined_at is not None]


def _await_connections(inbox: queue.Queue[Any], count: int, deadline: float) -> None:
    connected = 0
    while connected < count:
        event = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        assert isinstance(event, _Connected), event
        if event.failure is not None:
            raise ConnectionError(f"{event.name}: the broker refused the connection: {event.failure}")
        connected += 1


def _drive(
    inbox: queue.Queue[Any],
    clients: dict[str, AgentLikeClient],
    joins: deque[tuple[float, AgentLikeClient]],
    start: float,
    deadline: float,
) -> None:
    """The one loop: join on schedule, ask after SUBACK, re-ask on the agent's interval, take chunks."""
    while not all(c.complete for c in clients.values()):
        now = time.monotonic()
        if now > deadline:
            return
        while joins and start + joins[0][0] <= now:
            joins.popleft()[1].join(now)
        for client in clients.values():
            due = client.reask_due()
            if due is not None and due <= now:
                client.ask(now)
        wakes = [deadline] + [due for c in clients.values() if (due := c.reask_due()) is not None]
        if joins:
            wakes.append(start + joins[0][0])
        try:
            event = inbox.get(timeout=max(0.0, min(wakes) - time.monotonic()))
        except queue.Empty:
            continue
        client = clients[event.name]
        if isinstance(event, _Subscribed):
            if event.failure is not None:
                raise ConnectionError(f"{event.name}: the broker refused the subscription: {event.failure}")
            client.ask(time.monotonic())
        elif isinstance(event, _ChunkArrived):
            topic = parse_topic(event.topic)
            assert topic.chunk_index is not None
            client.accept(topic.chunk_index, event.payload, event.at)
