"""The agent's single loop: MQTT in, updater steps, reports out.

paho hands every message to ``inbox``; this loop decodes it (the only place
payloads become objects), dispatches by topic kind, and drives the updater.
A bad message is logged and dropped; it never ends the loop. Nothing here
blocks for long: the trial runs in a child the updater polls, and a broker
that went away only delays reports, which wait in the outbox.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import AgentConfig
from agent.measure import Measurer
from agent.outbox import Outbox
from agent.root import RootTrust
from agent.serving import Serving
from agent.updater import Updater
from shared import PROTOCOL_VERSION
from shared.errors import EdgefleetError, ProtocolError
from shared.interpreter import RuntimeInfo, runtime_info
from shared.messages import (
    MAX_AGENT_PACKET,
    REJECTED,
    ActiveModel,
    Availability,
    BenchmarkResult,
    ChunkRequest,
    Command,
    DesiredState,
    DeviceState,
    Event,
    PreviousModel,
    ReportAck,
    RootChain,
    ServingReport,
    Telemetry,
    UpdateState,
    clip_reason,
    decode_payload,
    encode_payload,
)
from shared.mqtt import Inbound, LinkDown, LinkUp, MqttLink, NetworkLoop, Will
from shared.topics import ROOT_TOPIC, Topic, TopicKind, chunk_topic, device_topic, parse_topic, want_topic

logger = logging.getLogger(__name__)

WANT_EXPIRY_S = 30  # a chunk request nobody served by then is stale: the agent has asked again
REJECTION_INTERVAL_S = 10.0
SERVING = "serving"  # the outbox's tag for serving reports (see agent/serving/reporter.py)


class ServingPart(Protocol):
    """What the loop asks of its serving side (``agent/serving``; a simulated device has none)."""

    def start(self) -> None: ...

    def sync(self) -> None: ...

    def tick(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class _MeasureChannel:
    """What the measurer may tell the outside world: its chunk subscriptions are its own."""

    service: AgentService

    def measured(self, measurement_id: str, benchmark: BenchmarkResult | None, accuracy: float | None,
                 samples: int | None, reason: str | None) -> None:
        self.service.measured(measurement_id, benchmark, accuracy, samples, reason)

    def want(self, sha256: str, ranges: list[tuple[int, int]]) -> None:
        self.service.want(sha256, ranges)

    def watch_chunks(self, sha256: str, indices: Collection[int]) -> None:
        self.service.watch_chunks(sha256, indices, owner="measure")


class AgentService:
    def __init__(
        self, config: AgentConfig, *, updater_factory: Callable[..., Updater] = Updater,
        serving_factory: Callable[..., ServingPart] = Serving, inbox: queue.Queue[Any] | None = None,
        network: NetworkLoop | None = None,
    ) -> None:
        """``inbox`` and ``network``: a simulated fleet (``agent/simulate``) runs many services on a few
        threads: it is told which inbox has work, and one network loop serves every link."""
        self.config = config
        self.device_id = config.device.id
        self.boot_id = uuid.uuid4().hex[:16]
        self._seq = 0
        self._rejection_seq = 0
        self._last_rejection_sent = float("-inf")
        self._rejections_held = 0
        self.inbox: queue.Queue[Any] = queue.Queue() if inbox is None else inbox
        self.stopping = threading.Event()
        # by file, then by who downloads it (the updater, the measurer): the chunk topics each listens to
        self._chunk_topics: dict[str, dict[str, set[str]]] = {}
        offline = encode_payload(Availability(v=PROTOCOL_VERSION, online=False))
        self.link = MqttLink(
            config.broker_address(),
            client_id=f"ef-agent-{self.device_id}",
            inbox=self.inbox,
            will=Will(device_topic(TopicKind.AVAILABILITY, self.device_id), offline),
            max_packet_bytes=MAX_AGENT_PACKET,
            network=network,
        )
        self.runtime = self._runtime()
        self.outbox = Outbox(config.data_dir / "outbox", lambda topic, payload: self.link.publish(topic, payload))
        # None with pinned keys (the older [keys] form): such an agent never rotates
        self.root = RootTrust(config) if config.keys.uses_root else None
        self.updater = updater_factory(config, self)
        if self.root is not None:
            self.updater.use_keys(self.root.keys)
        self.measurer = Measurer(
            config, _MeasureChannel(self), keys=lambda: self.updater.keys,
            release_counter=lambda: self.updater.trusted.release_counter, busy=self.installing,
        )
        self.serving = serving_factory(config, send=self.serving_report, backlog=lambda: self.outbox.waiting(SERVING))
        self._handlers: dict[TopicKind, Callable[[Topic, Inbound], None]] = {
            TopicKind.DESIRED: self._on_desired,
            TopicKind.CMD: self._on_command,
            TopicKind.ACK: self._on_ack,
            TopicKind.CHUNK: self._on_chunk,
            TopicKind.ROOT: self._on_root,
        }

    def _runtime(self) -> RuntimeInfo:
        try:
            return runtime_info(self.config.runtime.preferred or None)
        except EdgefleetError as exc:
            logger.error("%s", exc)
            return RuntimeInfo("none", "")

    # -- Reporter (called by the updater) ----------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _publish(self, kind: TopicKind, message: Any, *, retain: bool = False) -> None:
        """State and availability: only worth sending while connected (each connect repeats them)."""
        try:
            self.link.publish(device_topic(kind, self.device_id), encode_payload(message), retain=retain,
                              when_offline="drop")
        except EdgefleetError as exc:
            logger.warning("could not publish %s: %s", kind.value, exc)

    def _report(self, kind: TopicKind, message: Any) -> None:
        """Events and telemetry go through the outbox, until the server says it stored them."""
        self.outbox.send(device_topic(kind, self.device_id), encode_payload(message))

    def event(self, deployment_id: str, state: UpdateState, reason: str) -> None:
        logger.info("deployment %s: %s %s", deployment_id, state.value, reason)
        self._report(
            TopicKind.EVENTS,
            Event(
                v=PROTOCOL_VERSION, device_id=self.device_id, boot_id=self.boot_id, seq=self._next_seq(),
                deployment_id=deployment_id, state=state.value, reason=reason, ts=time.time(),
            ),
        )

    def rejected(self, claimed_deployment: str, reason: str) -> None:
        """Tell the operator about a refused desired state, at most once per REJECTION_INTERVAL_S.

        Anyone who can publish can send them, so they never take a place in the bounded outbox
        (they would push real reports out of it) and never a sequence number of the reports:
        they are sent once, best effort, under a boot id of their own, and counted when held back.
        """
        now = time.monotonic()
        if now - self._last_rejection_sent < REJECTION_INTERVAL_S:
            self._rejections_held += 1
            return
        if self._rejections_held:
            reason = f"{reason} (and {self._rejections_held} more rejected since the last report)"
        self._last_rejection_sent, self._rejections_held = now, 0
        self._rejection_seq += 1
        rejection = Event(
            v=PROTOCOL_VERSION, device_id=self.device_id, boot_id=f"{self.boot_id}-rejections",
            seq=self._rejection_seq, deployment_id=claimed_deployment, state=REJECTED, reason=clip_reason(reason),
            ts=time.time(),
        )
        try:
            self.link.publish(device_topic(TopicKind.EVENTS, self.device_id), encode_payload(rejection),
                              when_offline="drop")
        except EdgefleetError as exc:
            logger.warning("could not report a rejected desired state: %s", exc)

    def telemetry(
        self, deployment_id: str, benchmark: BenchmarkResult, accuracy: float, samples: int,
        previous: PreviousModel | None,
    ) -> None:
        compared = "" if previous is None else (
            f" (replaced {previous.model} v{previous.version}: p50 {previous.p50_ms:.3f} ms, "
            f"p95 {previous.p95_ms:.3f} ms, accuracy {previous.accuracy:.4f})"
        )
        logger.info(
            "trial of %s: p50 %.3f ms, p95 %.3f ms, accuracy %.4f on %d samples%s",
            deployment_id, benchmark.p50_ms, benchmark.p95_ms, accuracy, samples, compared,
        )
        self._report(
            TopicKind.TELEMETRY,
            Telemetry(
                v=PROTOCOL_VERSION,
                device_id=self.device_id,
                boot_id=self.boot_id,
                seq=self._next_seq(),
                deployment_id=deployment_id,
                kind="trial",
                ts=time.time(),
                benchmark=benchmark,
                accuracy=accuracy,
                samples=samples,
                previous=previous,
            ),
        )

    def serving_report(self, report: ServingReport, deployment_id: str) -> None:
        """One interval of the served model's calls (agent/serving/reporter.py), through the outbox."""
        self.outbox.send(
            device_topic(TopicKind.TELEMETRY, self.device_id),
            encode_payload(Telemetry(
                v=PROTOCOL_VERSION, device_id=self.device_id, boot_id=self.boot_id, seq=self._next_seq(),
                deployment_id=deployment_id or None, kind="serving", ts=time.time(), serving=report,
            )),
            kind=SERVING,
        )

    def state_changed(self, *, hello: bool = False) -> None:
        self.serving.sync()  # a commit or a rollback may have changed the model to serve
        manifest, active_deployment = self.updater.active_summary()
        active = None
        if manifest is not None and active_deployment is not None:
            active = ActiveModel(
                model=manifest.model,
                version=manifest.version,
                sha256=manifest.file("model").sha256,
                quantization=manifest.quantization,
                deployment_id=active_deployment,
            )
        self._publish(
            TopicKind.STATE,
            DeviceState(
                v=PROTOCOL_VERSION,
                device_id=self.device_id,
                boot_id=self.boot_id,
                runtime=self.runtime.name,
                runtime_version=self.runtime.version,
                update_state=self.updater.state.value,
                deployment_id=self.updater.record.deployment_id,
                directive_seq=self.updater.trusted.directive_seq,
                active=active,
                hello=hello,
                outcome=self.updater.outcome(),
            ),
            retain=True,
        )

    def want(self, sha256: str, ranges: list[tuple[int, int]]) -> None:
        if not ranges:
            return
        message = ChunkRequest(v=PROTOCOL_VERSION, device_id=self.device_id, ranges=tuple(ranges))
        try:  # each connect asks again for what is missing, so a request is not kept while offline
            self.link.publish(want_topic(self.device_id, sha256), encode_payload(message), when_offline="drop",
                              expiry_s=WANT_EXPIRY_S)
        except EdgefleetError as exc:
            logger.warning("could not ask for chunks: %s", exc)

    def watch_chunks(self, sha256: str, indices: Collection[int], *, owner: str = "update") -> None:
        """One topic per chunk still missing, not the file's wildcard: the server publishes a chunk for
        whoever asked, and a device listening to all of them would receive every copy that any device in
        the wave asked for, again and again until its own download ends (quadratic in a large wave).
        ``owner``: the updater and a measurement may fetch the same file (an eval slice) at once; a topic
        stays subscribed while either wants it."""
        watchers = self._chunk_topics.setdefault(sha256, {})
        held = set().union(*watchers.values())
        watchers[owner] = {chunk_topic(sha256, index) for index in indices}
        if not watchers[owner]:
            del watchers[owner]
        wanted = set().union(*watchers.values())
        if not watchers:
            del self._chunk_topics[sha256]
        self.link.unsubscribe(*sorted(held - wanted))
        self.link.subscribe(*sorted(wanted - held))

    def measured(self, measurement_id: str, benchmark: BenchmarkResult | None, accuracy: float | None,
                 samples: int | None, reason: str | None) -> None:
        """A benchmark-only trial's result, or why there is none (agent/measure.py), through the outbox."""
        self._report(TopicKind.TELEMETRY, Telemetry(
            v=PROTOCOL_VERSION, device_id=self.device_id, boot_id=self.boot_id, seq=self._next_seq(),
            deployment_id=measurement_id, kind="measurement", ts=time.time(), benchmark=benchmark,
            accuracy=accuracy, samples=samples, reason=reason,
        ))

    def installing(self) -> str | None:
        """The install under way or waiting, if any: it comes before a measurement."""
        deployment = self.updater.install_under_way()
        return None if deployment is None else f"the device is installing deployment {deployment}"

    # -- inbound -------------------------------------------------------------

    def _on_desired(self, topic: Topic, message: Inbound) -> None:
        if not message.payload:
            return  # a cleared retained message
        desired = decode_payload(TopicKind.DESIRED, message.payload)
        assert isinstance(desired, DesiredState)
        self.updater.offer(desired)

    def _on_command(self, topic: Topic, message: Inbound) -> None:
        command = decode_payload(TopicKind.CMD, message.payload)
        assert isinstance(command, Command)
        if command.name == "ping":
            self.state_changed()
        elif command.name == "measure":
            self.measurer.offer(command)

    def _on_ack(self, topic: Topic, message: Inbound) -> None:
        ack = decode_payload(TopicKind.ACK, message.payload)
        assert isinstance(ack, ReportAck)
        self.outbox.acknowledge(ack.boot_id, ack.seqs)

    def _on_chunk(self, topic: Topic, message: Inbound) -> None:
        assert topic.sha256 is not None and topic.chunk_index is not None
        if not self.measurer.on_chunk(topic.sha256, topic.chunk_index, message.payload):
            self.updater.on_chunk(topic.sha256, topic.chunk_index, message.payload)

    def _on_root(self, topic: Topic, message: Inbound) -> None:
        if not message.payload or self.root is None:
            return  # a cleared retained message; or pinned keys, which never rotate
        chain = decode_payload(TopicKind.ROOT, message.payload)
        assert isinstance(chain, RootChain)
        if self.root.receive(chain, rejected=lambda reason: self.rejected("", reason)):
            self.updater.use_keys(self.root.keys)

    def handle(self, item: Any) -> None:
        """Dispatch one inbox record; malformed input is logged and dropped."""
        if isinstance(item, LinkUp):  # the link itself logs connects, failed attempts and losses
            self._publish(
                TopicKind.AVAILABILITY, Availability(v=PROTOCOL_VERSION, online=True, boot_id=self.boot_id), retain=True
            )
            self.state_changed(hello=True)
            self.outbox.link_up()
            try:
                self.updater.request_missing()
                self.measurer.request_missing()
            except EdgefleetError as exc:  # e.g. a full disk as the download fails: the next tick retries
                logger.error("could not ask for the missing chunks: %s", exc)
            return
        if isinstance(item, LinkDown):
            logger.debug("link down: %s", item.reason)
            return
        assert isinstance(item, Inbound)
        try:
            topic = parse_topic(item.topic)
            handler = self._handlers.get(topic.kind)
            if handler is None or (topic.device_id not in (None, self.device_id)):
                raise ProtocolError(f"unexpected topic {item.topic}")
            handler(topic, item)
        except ProtocolError as exc:
            logger.warning("dropped a malformed message on %s: %s", item.topic, exc)
        except EdgefleetError as exc:
            # e.g. a full disk: the update record stays as it was; the next message or tick retries.
            logger.error("could not handle the message on %s: %s", item.topic, exc)
        except Exception:  # a bug: one message must still not take the device's agent down
            logger.exception("unexpected error handling the message on %s; dropped", item.topic)

    # -- lifecycle -------------------------------------------------------

    def run(self) -> None:
        self.begin()
        try:
            while not self.stopping.is_set():
                try:
                    item = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    item = None
                if item is not None:
                    self.handle(item)
                self.tick()
        finally:
            self.finish()

    def begin(self) -> None:
        """Subscribe, replay the outbox, resume an update in flight, connect and start serving."""
        self.link.subscribe(device_topic(TopicKind.DESIRED, self.device_id))
        self.link.subscribe(device_topic(TopicKind.CMD, self.device_id))
        self.link.subscribe(device_topic(TopicKind.ACK, self.device_id))
        if self.root is not None:
            self.link.subscribe(ROOT_TOPIC)
            logger.info("root of trust v%d", self.root.version)
        replayed = self.outbox.replay()
        if replayed:
            logger.info("re-sending %d reports a previous run could not deliver", replayed)
        try:
            self.updater.resume()
        except EdgefleetError as exc:  # e.g. a full disk: the loop's tick tries again
            logger.error("could not resume the update in flight (retrying): %s", exc)
        self.link.start()
        logger.info("agent %s (%s) starting, runtime %s %s", self.config.device.name, self.device_id,
                    self.runtime.name, self.runtime.version)
        self.serving.start()

    def tick(self) -> None:
        """The periodic work of one pass of the loop: update step, measurement, serving reports, resends."""
        _guarded(self.updater.tick, "update step")
        _guarded(self.measurer.tick, "measurement step")
        _guarded(self.serving.tick, "serving report")
        self.outbox.retry_due(connected=self.link.connected.is_set())

    def finish(self) -> None:
        """End a trial, stop serving (its last report into the outbox), say offline and disconnect."""
        self.updater.stop()
        self.measurer.stop()
        try:
            self.serving.stop()  # the last report goes into the outbox before the link closes
        except Exception:
            logger.exception("unexpected error stopping the inference endpoint")
        offline = encode_payload(Availability(v=PROTOCOL_VERSION, online=False, boot_id=self.boot_id))
        self.link.stop(final=(device_topic(TopicKind.AVAILABILITY, self.device_id), offline))

    def stop(self) -> None:
        self.stopping.set()


def _guarded(step: Callable[[], None], what: str) -> None:
    """One part of the loop's periodic work: its failure is logged, and the other parts go on."""
    try:
        step()
    except EdgefleetError as exc:  # e.g. a full disk: the next tick retries
        logger.error("%s failed: %s", what, exc)
    except Exception:  # a bug: the agent must keep updating, answering and reporting all the same
        logger.exception("unexpected error in a %s", what)
