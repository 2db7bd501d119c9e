"""``ServerService.handle_batch``: one bad message is logged and dropped, never spoils the batch.

The service is built against a real workspace and a broker address on an
unused port; ``run()`` is never called, so nothing connects. Its link's
``publish`` is replaced by a recorder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select

from server.db import ConcurrentChange
from server.db.models import Artifact, Deployment, Device, EventRecord, TelemetryRecord
from server.devices import register_device
from server.service import ServerService
from server.setup import Workspace
from shared import PROTOCOL_MINOR, PROTOCOL_VERSION
from shared.codec import encode
from shared.errors import StorageError
from shared.messages import (
    MAX_CONTROL_PAYLOAD,
    ChunkRequest,
    DeploymentOutcome,
    DeviceState,
    Event,
    ReportAck,
    decode_payload,
    encode_payload,
)
from shared.mqtt import BrokerAddress, Inbound, LinkDown, LinkUp
from shared.topics import TopicKind, chunk_topic, device_topic, want_topic
from tests.server.rollout_helpers import start_all_at_once


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, bool]] = []

    def __call__(self, topic: str, payload: bytes, *, retain: bool = False, **options: Any) -> None:
        self.calls.append((topic, payload, retain))


@dataclass
class Setup:
    workspace: Workspace
    service: ServerService
    published: Recorder
    cam: str
    other: str
    rollout: str
    deployment: str


@pytest.fixture
def setup(workspace: Workspace) -> Iterator[Setup]:
    cam = register_device(workspace.db, "cam-1", "x86-64").id
    other = register_device(workspace.db, "cam-2", "x86-64").id
    rollout_id = start_all_at_once(workspace, "cam-1")
    with workspace.db.session() as session:
        deployment = session.scalars(select(Deployment.id).where(Deployment.rollout_id == rollout_id)).one()
    service = ServerService(workspace.data_dir, BrokerAddress("127.0.0.1", unused_port()), db=workspace.db)
    recorder = Recorder()
    service.link.publish = recorder  # type: ignore[method-assign]
    yield Setup(workspace, service, recorder, cam, other, rollout_id, deployment)
    service.link.stop()


# -- messages -------------------------------------------------------------------------------


def event_dict(s: Setup, seq: int, state: str = "downloading", **overrides: Any) -> dict[str, Any]:
    message = Event(
        v=PROTOCOL_VERSION, device_id=s.cam, boot_id="boot-1", seq=seq, deployment_id=s.deployment, state=state,
        reason="", ts=1_700_000_000.0 + seq,
    )
    return {**encode(message), **overrides}


def inbound(topic: str, payload: bytes | dict[str, Any], *, retain: bool = False) -> Inbound:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Inbound(topic=topic, payload=body, retain=retain)


def valid_event(s: Setup, seq: int, state: str) -> Inbound:
    return inbound(device_topic(TopicKind.EVENTS, s.cam), event_dict(s, seq, state))


def deployment_state(s: Setup) -> str:
    with s.workspace.db.session() as session:
        deployment = session.get(Deployment, s.deployment)
        assert deployment is not None
        return deployment.state


def events_stored(s: Setup) -> int:
    with s.workspace.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(EventRecord)) or 0)


def artifact_sha(s: Setup) -> str:
    with s.workspace.db.session() as session:
        return session.scalars(select(Artifact.sha256)).first() or ""


# -- one bad message among good ones ------------------------------------------------------------

BAD_MESSAGES: dict[str, Any] = {
    "malformed JSON": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), b'{"v": 1, "device_id": '),
    "not UTF-8": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), b"\xff\xfe\x00"),
    "JSON that is not an object": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), b"[1, 2, 3]"),
    "wrong version": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), event_dict(s, 2, "failed", v=2)),
    "unknown keys": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), event_dict(s, 2, "failed", extra=1)),
    "missing key": lambda s: inbound(
        device_topic(TopicKind.EVENTS, s.cam), {k: v for k, v in event_dict(s, 2, "failed").items() if k != "seq"}
    ),
    "wrong type": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), {**event_dict(s, 2, "failed"), "seq": "2"}),
    "deeply nested JSON": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), b"[" * 100_000 + b"]" * 100_000),
    "unknown update state": lambda s: inbound(device_topic(TopicKind.EVENTS, s.cam), {**event_dict(s, 2, "failed"), "state": "exploded"}),
    "oversized payload": lambda s: inbound(
        device_topic(TopicKind.EVENTS, s.cam), event_dict(s, 2, "failed", reason="x" * MAX_CONTROL_PAYLOAD)
    ),
    "event on another device's topic": lambda s: inbound(
        device_topic(TopicKind.EVENTS, s.other), event_dict(s, 2, "failed")
    ),
    "telemetry on another device's topic": lambda s: inbound(
        device_topic(TopicKind.TELEMETRY, s.other),
        {"v": 1, "device_id": s.cam, "boot_id": "b", "seq": 1, "deployment_id": s.deployment, "kind": "trial",
         "ts": 1.0, "accuracy": 0.1},
    ),
    "state on another device's topic": lambda s: inbound(
        device_topic(TopicKind.STATE, s.other),
        encode(DeviceState(v=1, device_id=s.cam, boot_id="b", runtime="r", runtime_version="1", update_state="idle",
                           deployment_id=None, directive_seq=0, active=None, hello=True)),
        retain=True,
    ),
    "want for a sha256 no release names": lambda s: inbound(
        want_topic(s.cam, hashlib.sha256(b"not an artifact").hexdigest()),
        encode(ChunkRequest(v=1, device_id=s.cam, ranges=((0, 1),))),
    ),
    "want on another device's topic": lambda s: inbound(
        want_topic(s.other, artifact_sha(s)), encode(ChunkRequest(v=1, device_id=s.cam, ranges=((0, 1),))),
    ),
    "unknown device topic": lambda s: inbound(f"ef/v1/devices/{s.cam}/bogus", event_dict(s, 2, "failed")),
    "topic outside the protocol": lambda s: inbound("other/app/topic", b"{}"),
    "invalid device id in the topic": lambda s: inbound("ef/v1/devices/Not_An_Id/events", event_dict(s, 2, "failed")),
    "a topic the server only publishes": lambda s: inbound(device_topic(TopicKind.DESIRED, s.cam), b"{}"),
    "a chunk topic": lambda s: inbound(chunk_topic(artifact_sha(s), 0), b"raw bytes"),
}


@pytest.mark.parametrize("bad", list(BAD_MESSAGES), ids=list(BAD_MESSAGES))
def test_one_bad_message_is_logged_and_dropped_while_the_rest_applies(
    setup: Setup, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    message = BAD_MESSAGES[bad](setup)
    batch = [valid_event(setup, 1, "downloading"), message, valid_event(setup, 3, "trial")]

    with caplog.at_level(logging.WARNING, logger="server"):
        setup.service.handle_batch(batch)

    assert deployment_state(setup) == "trial"
    assert events_stored(setup) == 2
    dropped = [r for r in caplog.records if r.name == "server.service" and r.levelno >= logging.WARNING]
    assert len(dropped) == 1, caplog.text
    assert message.topic in dropped[0].getMessage()
    # Only the two stored reports are acknowledged to their agent, after the commit, in one message.
    ((topic, payload, retain),) = setup.published.calls
    assert topic == device_topic(TopicKind.ACK, setup.cam) and not retain
    assert decode_payload(TopicKind.ACK, payload) == ReportAck(v=1, boot_id="boot-1", seqs=(1, 3))


def test_a_batch_of_only_bad_messages_changes_nothing(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    batch = [make(setup) for make in BAD_MESSAGES.values()]

    with caplog.at_level(logging.WARNING, logger="server"):
        setup.service.handle_batch(batch)

    assert deployment_state(setup) == "pending"
    assert events_stored(setup) == 0
    dropped = [r for r in caplog.records if r.name == "server.service" and r.levelno >= logging.WARNING]
    assert len(dropped) == len(BAD_MESSAGES)


def test_link_changes_and_cleared_retained_messages_are_not_errors(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    batch = [
        LinkUp(),
        inbound(device_topic(TopicKind.STATE, setup.cam), b"", retain=True),  # a cleared retained state
        valid_event(setup, 1, "downloading"),
        LinkDown("connection lost"),
        valid_event(setup, 2, "staged"),
    ]

    with caplog.at_level(logging.DEBUG, logger="server.service"):
        setup.service.handle_batch(batch)

    assert deployment_state(setup) == "staged"
    messages = [r.getMessage() for r in caplog.records if r.name == "server.service"]
    assert any("connected to" in m for m in messages)
    assert any("disconnected" in m and "connection lost" in m for m in messages)
    assert not any("dropped" in m for m in messages)


def test_duplicates_in_one_batch_are_applied_once(setup: Setup) -> None:
    message = valid_event(setup, 1, "downloading")
    setup.service.handle_batch([message, message, message])
    assert events_stored(setup) == 1


def test_a_report_whose_apply_raises_is_taken_back_alone_and_not_acknowledged(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from server import report_batch, service

    real = report_batch.apply_new_report

    def failing_on_seq_2(session: Any, device: Any, report: Any) -> None:
        real(session, device, report)  # its changes are made, then rolled back to the savepoint
        if report.seq == 2:
            raise RuntimeError("a bug in one report's apply")

    monkeypatch.setattr(service, "apply_new_report", failing_on_seq_2)
    with caplog.at_level(logging.ERROR, logger="server.service"):
        setup.service.handle_batch([valid_event(setup, 1, "downloading"), valid_event(setup, 2, "staged"),
                                    valid_event(setup, 3, "trial")])

    assert events_stored(setup) == 2  # the bulk insert stored 3; the failed one was taken back
    assert deployment_state(setup) == "trial"
    assert "unexpected error applying" in caplog.text
    ((_, payload, _),) = setup.published.calls
    assert decode_payload(TopicKind.ACK, payload).seqs == (1, 3)  # seq 2 is sent again, and applied then
    monkeypatch.undo()
    setup.service.handle_batch([valid_event(setup, 2, "staged")])
    assert events_stored(setup) == 3 and deployment_state(setup) == "trial"


def test_telemetry_and_availability_apply(setup: Setup) -> None:
    telemetry = {
        "v": 1, "device_id": setup.cam, "boot_id": "b", "seq": 1, "deployment_id": setup.deployment, "kind": "trial",
        "ts": 1.0, "accuracy": 0.97, "samples": 200,
        "benchmark": {"runtime": "ai_edge_litert", "threads": 1, "init_ms": 1.0, "first_ms": 1.0, "warmup_runs": 1,
                      "runs": 10, "mean_ms": 0.3, "std_ms": 0.01, "min_ms": 0.2, "max_ms": 0.5, "p50_ms": 0.3,
                      "p90_ms": 0.4, "p95_ms": 0.45, "p99_ms": 0.5, "peak_rss_bytes": 1000},
    }
    setup.service.handle_batch([
        inbound(device_topic(TopicKind.TELEMETRY, setup.cam), telemetry),
        inbound(device_topic(TopicKind.AVAILABILITY, setup.cam), {"v": 1, "online": True}, retain=True),
    ])

    with setup.workspace.db.session() as session:
        deployment = session.get(Deployment, setup.deployment)
        device = session.get(Device, setup.cam)
        assert deployment is not None and device is not None
        assert (deployment.p50_ms, deployment.p95_ms, deployment.accuracy) == (0.3, 0.45, 0.97)
        assert device.online is True
        assert session.scalar(select(func.count()).select_from(TelemetryRecord)) == 1


def test_serving_reports_in_a_batch_are_stored_once_acknowledged_and_compacted_later(setup: Setup) -> None:
    from server.db.models import ServingReportRecord, ServingRollup
    from tests.server.latency_helpers import serving

    report = inbound(device_topic(TopicKind.TELEMETRY, setup.cam),
                     encode(serving(setup.cam, 5, [1.0, 2.0], end=time.time() - 2 * 86400, boot="boot-9")))
    setup.service.handle_batch([report, report])
    acks = [decode_payload(TopicKind.ACK, payload) for topic, payload, _ in setup.published.calls
            if topic == device_topic(TopicKind.ACK, setup.cam)]
    assert acks == [ReportAck(v=1, boot_id="boot-9", seqs=(5, 5))]  # both deliveries may be forgotten
    with setup.workspace.db.reading() as session:
        assert session.scalar(select(func.count()).select_from(ServingReportRecord)) == 1

    setup.service.compact_latency()  # older than the default day of raw retention, within the 30 days of rollups
    with setup.workspace.db.reading() as session:
        assert session.scalar(select(func.count()).select_from(ServingReportRecord)) == 0
        assert session.scalar(select(ServingRollup.calls)) == 2


def test_a_want_for_a_released_artifact_publishes_its_chunks_when_the_window_closes(setup: Setup) -> None:
    sha = artifact_sha(setup)
    request = encode(ChunkRequest(v=1, device_id=setup.cam, ranges=((0, 1),)))
    chunks = setup.service.chunks

    setup.service.handle_batch([inbound(want_topic(setup.cam, sha), request)])
    assert setup.published.calls == []  # other devices of the wave may still ask
    due = chunks.next_due()
    assert due is not None
    assert setup.service._wait_s(next_tick=due + 10) <= chunks.window_s  # the loop wakes for it, not for the tick

    chunks.flush(due)

    assert setup.published.calls == [(chunk_topic(sha, 0), setup.workspace.blobs.read(sha)[: 256 * 1024], False)]


def test_a_hello_from_a_device_that_missed_its_directive_gets_it_again(setup: Setup) -> None:
    setup.service.engine.tick(time.time())
    first = list(setup.published.calls)
    assert [t for t, _, _ in first] == [device_topic(TopicKind.DESIRED, setup.cam)]
    hello = DeviceState(v=1, device_id=setup.cam, boot_id="b", runtime="ai_edge_litert", runtime_version="1.2.0",
                        update_state="idle", deployment_id=None, directive_seq=0, active=None, hello=True)

    setup.service.handle_batch([inbound(device_topic(TopicKind.STATE, setup.cam), encode_payload(hello), retain=True)])
    assert len(setup.published.calls) == 1  # not before the batch committed: the next tick sends it
    setup.service.engine.tick(time.time())

    assert len(setup.published.calls) == 2
    topic, payload, retain = setup.published.calls[1]
    assert (topic, retain) == (device_topic(TopicKind.DESIRED, setup.cam), True)
    assert decode_payload(TopicKind.DESIRED, payload).directive.signed["deployment_id"] == setup.deployment


def test_a_hello_from_an_up_to_date_device_gets_nothing(setup: Setup) -> None:
    setup.service.engine.tick(time.time())
    hello = DeviceState(v=1, device_id=setup.cam, boot_id="b", runtime="ai_edge_litert", runtime_version="1.2.0",
                        update_state="downloading", deployment_id=setup.deployment, directive_seq=1, active=None,
                        hello=True)

    setup.service.handle_batch([inbound(device_topic(TopicKind.STATE, setup.cam), encode_payload(hello), retain=True)])
    setup.service.engine.tick(time.time())

    assert len(setup.published.calls) == 1


# -- hostile numbers ------------------------------------------------------------------------------


def _raw_event_payload(s: Setup, *, seq: str = "2", ts: str = "1.0") -> bytes:
    return (
        f'{{"v":1,"device_id":"{s.cam}","boot_id":"b","seq":{seq},"deployment_id":"{s.deployment}",'
        f'"state":"failed","reason":"","ts":{ts}}}'
    ).encode()


ESCAPING: dict[str, Any] = {
    "an integer too large for a float field": lambda s: _raw_event_payload(s, ts="1" + "0" * 400),
    "an integer literal over 4300 digits": lambda s: _raw_event_payload(s, seq="7" * 5000),
    "an integer too large for SQLite": lambda s: _raw_event_payload(s, seq=str(2**70)),
}


@pytest.mark.parametrize("make_payload", list(ESCAPING.values()), ids=list(ESCAPING))
def test_hostile_numbers_are_dropped_like_any_malformed_message(
    setup: Setup, make_payload: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bad = inbound(device_topic(TopicKind.EVENTS, setup.cam), make_payload(setup))
    batch = [valid_event(setup, 1, "downloading"), bad, valid_event(setup, 3, "trial")]

    with caplog.at_level(logging.WARNING, logger="server.service"):
        setup.service.handle_batch(batch)  # today: raises out of the loop, losing the whole batch

    assert deployment_state(setup) == "trial"
    assert events_stored(setup) == 2
    assert bad.topic in caplog.text


# -- nothing is acknowledged before it is stored ------------------------------------------------


class AckRecorder:
    def __init__(self) -> None:
        self.acked: list[Inbound] = []

    def __call__(self, messages: list[Inbound]) -> None:
        self.acked.extend(messages)


def test_messages_are_acknowledged_to_the_broker_only_after_the_batch_committed(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = AckRecorder()
    monkeypatch.setattr(setup.service.link, "ack_all", recorder)
    good = [valid_event(setup, 1, "downloading"), valid_event(setup, 2, "verifying")]
    malformed = inbound(device_topic(TopicKind.EVENTS, setup.cam), b"{")

    setup.service.handle_batch([*good, malformed, LinkDown("gone")])
    assert recorder.acked == [*good, malformed]  # a malformed one is done with too: it would never parse

    def failing_session() -> Any:
        raise StorageError("database is locked")

    monkeypatch.setattr(setup.service.db, "session", failing_session)
    with pytest.raises(StorageError):
        setup.service.handle_batch([valid_event(setup, 3, "staged")])
    assert len(recorder.acked) == 3  # not acknowledged: the loop keeps it and tries again
    assert [c for c in setup.published.calls if "/ack" in c[0]] == [setup.published.calls[0]]


def test_reports_are_acknowledged_to_their_agent_even_when_already_stored(setup: Setup) -> None:
    """The agent sends again what it heard no acknowledgement for: the copy must be acknowledged too."""
    setup.service.handle_batch([valid_event(setup, 1, "downloading")])
    setup.service.handle_batch([valid_event(setup, 1, "downloading")])
    acks = [decode_payload(TopicKind.ACK, p) for t, p, _ in setup.published.calls]
    assert acks == [ReportAck(v=1, boot_id="boot-1", seqs=(1,))] * 2
    assert events_stored(setup) == 1


def test_reports_of_an_unknown_device_are_not_acknowledged(setup: Setup) -> None:
    ghost = "d-0000000000"
    body = {**event_dict(setup, 1), "device_id": ghost}
    setup.service.handle_batch([inbound(device_topic(TopicKind.EVENTS, ghost), body)])
    assert setup.published.calls == []


def test_a_rejection_is_stored_and_acknowledged_but_never_applied(setup: Setup) -> None:
    """An agent refused a desired state that claimed this deployment: the claim changes nothing."""
    rejection = inbound(
        device_topic(TopicKind.EVENTS, setup.cam),
        event_dict(setup, 1, "rejected", reason="rejected: no valid signature by a pinned director key"),
    )
    setup.service.handle_batch([valid_event(setup, 2, "downloading"), rejection])
    assert deployment_state(setup) == "downloading"
    assert events_stored(setup) == 2
    ((_, payload, _),) = setup.published.calls
    assert decode_payload(TopicKind.ACK, payload).seqs == (2, 1)


def test_the_ingest_counters_say_what_each_message_became(setup: Setup) -> None:
    from server.ingest_counters import INGEST

    before = INGEST.snapshot()
    message = valid_event(setup, 1, "downloading")
    ghost = Event(v=PROTOCOL_VERSION, device_id="d-ghost", boot_id="b", seq=1, deployment_id="dep-x",
                  state="downloading", reason="", ts=1.0)
    setup.service.handle_batch([
        message, message, inbound(device_topic(TopicKind.EVENTS, "d-ghost"), encode(ghost)),
        inbound(device_topic(TopicKind.EVENTS, setup.cam), b"{not json"), inbound("nowhere/at/all", b"{}"),
    ])
    after = INGEST.snapshot()
    grown = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert grown == {("events", "stored"): 1, ("events", "duplicate"): 1, ("events", "dropped"): 1,
                     ("events", "malformed"): 1, ("unknown", "malformed"): 1}


def test_a_newer_agents_reports_apply_without_the_fields_this_server_does_not_know(setup: Setup) -> None:
    """An agent of a newer minor protocol version adds optional fields (top level and nested); this server
    skips them and applies the rest. The same keys from an agent of this minor are malformed and dropped."""
    newer = {"minor": PROTOCOL_MINOR + 1}
    telemetry = {
        "v": 1, "device_id": setup.cam, "boot_id": "b", "seq": 2, "deployment_id": setup.deployment, "kind": "trial",
        "ts": 1.0, "accuracy": 0.97, "samples": 200, "npu": {"delegate": "ethos-u"}, **newer,
        "benchmark": {"runtime": "ai_edge_litert", "threads": 1, "init_ms": 1.0, "first_ms": 1.0, "warmup_runs": 1,
                      "runs": 10, "mean_ms": 0.3, "std_ms": 0.01, "min_ms": 0.2, "max_ms": 0.5, "p50_ms": 0.3,
                      "p90_ms": 0.4, "p95_ms": 0.45, "p99_ms": 0.5, "peak_rss_bytes": 1000, "energy_mj": 2.5},
    }
    setup.service.handle_batch([
        inbound(device_topic(TopicKind.EVENTS, setup.cam), event_dict(setup, 1, "downloading", battery=80, **newer)),
        inbound(device_topic(TopicKind.TELEMETRY, setup.cam), telemetry),
    ])
    assert events_stored(setup) == 1 and deployment_state(setup) == "downloading"
    with setup.workspace.db.session() as session:
        deployment = session.get(Deployment, setup.deployment)
        assert deployment is not None and deployment.p95_ms == 0.45

    setup.service.handle_batch([inbound(device_topic(TopicKind.EVENTS, setup.cam),
                                        event_dict(setup, 3, "verifying", battery=80, minor=PROTOCOL_MINOR))])
    assert events_stored(setup) == 1 and deployment_state(setup) == "downloading"


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)  # one server per SQLite file, serialised
def test_a_deployment_another_replica_changed_meanwhile_fails_the_batch_which_then_applies_anew(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, several replicas: a device's state settles its deployment while another replica changes
    that deployment after this batch read it. The batch's write is refused (row_version), the whole batch
    rolls back unacknowledged, and the loop's retry applies it on fresh data: nothing half-applied or lost.
    (A batch's events and telemetry lock the deployments they name up front, so there they wait instead.)"""
    from server import ingest

    recorder = AckRecorder()
    monkeypatch.setattr(setup.service.link, "ack_all", recorder)
    real = ingest.advance_deployment

    def engine_writes_first(session: Any, device: Any, deployment: Deployment, *args: Any) -> bool:
        with setup.workspace.db.session() as other:  # another connection: the leader's engine tick
            theirs = other.get(Deployment, deployment.id)
            assert theirs is not None
            theirs.reason = "touched by the engine"
        return real(session, device, deployment, *args)  # changes the row this batch read before

    monkeypatch.setattr(ingest, "advance_deployment", engine_writes_first)
    state = DeviceState(v=1, device_id=setup.cam, boot_id="b", runtime="r", runtime_version="1", update_state="idle",
                        deployment_id=None, directive_seq=1, active=None,
                        outcome=DeploymentOutcome(setup.deployment, "failed", "trial crashed"))
    batch = [inbound(device_topic(TopicKind.STATE, setup.cam), encode_payload(state), retain=True)]
    with pytest.raises(ConcurrentChange):
        setup.service.handle_batch(batch)
    assert recorder.acked == [] and deployment_state(setup) == "pending"

    monkeypatch.setattr(ingest, "advance_deployment", real)
    setup.service.handle_batch(batch)  # the loop's retry
    assert recorder.acked == batch and deployment_state(setup) == "failed"


def test_the_engine_ticks_at_most_a_third_of_the_time_but_often_enough_to_keep_its_lease(setup: Setup) -> None:
    from server.service import TICK_SHARE_FACTOR

    service = setup.service
    assert service.next_tick_in(0.01) == service.tick_interval  # a quick tick: the usual interval
    assert service.next_tick_in(0.9) == pytest.approx(TICK_SHARE_FACTOR * 0.9)  # a slow one: twice its time
    assert service.next_tick_in(60.0) == pytest.approx(service.lease.ttl_s / 3)  # never past a third of the lease
