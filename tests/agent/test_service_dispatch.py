"""AgentService.handle: malformed input is logged and dropped, never raised; reports survive a dead link.

The service is built against a broker address nothing listens on and is never
started, so every publish goes to a disconnected paho client: reports are
queued (the outbox keeps them), states and chunk requests are dropped until
the next connection repeats them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.service import AgentService
from agent.states import State
from agent.updater import Updater
from shared.codec import encode
from shared.messages import (
    MAX_DESIRED_PAYLOAD,
    Command,
    Event,
    MeasureOrder,
    PreviousModel,
    Telemetry,
    decode_payload,
    encode_payload,
)
from shared.mqtt import Inbound, LinkDown, LinkUp
from shared.signing import envelope_digest, sign_envelope
from shared.topics import TopicKind, chunk_topic, device_topic, parse_topic, want_topic
from tests.agent.fakes import ScriptedTrial
from tests.agent.material import BENCHMARK, DEVICE, NOW, Keys, chunk_of, make_config, make_release

OTHER = "pi-garage-02"
SHA = "ab" * 32


@pytest.fixture
def service(tmp_path: Path, keys: Keys) -> Iterator[AgentService]:
    config = make_config(tmp_path / "agent", keys, broker_url="mqtt://127.0.0.1:9")  # discard port: nobody home
    # The signed fixtures carry fixed timestamps, so the updater gets the matching wall clock.
    svc = AgentService(config, updater_factory=lambda cfg, reporter: Updater(cfg, reporter, clock=lambda: NOW))
    yield svc
    assert not svc.link.connected.is_set()


@pytest.fixture
def published(service: AgentService, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes, bool]]:
    """Every publish the service makes, passed through to the real (disconnected) link."""
    calls: list[tuple[str, bytes, bool]] = []
    real = service.link.publish

    def publish(topic: str, payload: bytes, **options: Any) -> int | None:
        calls.append((topic, payload, options.get("retain", False)))
        offline[parse_topic(topic).kind] = options.get("when_offline", "queue")
        return real(topic, payload, **options)

    offline: dict[TopicKind, str] = {}
    service.offline_modes = offline  # type: ignore[attr-defined]
    monkeypatch.setattr(service.link, "publish", publish)
    return calls


def desired_topic(device: str = DEVICE) -> str:
    return device_topic(TopicKind.DESIRED, device)


def valid_desired(keys: Keys, **kwargs: Any) -> bytes:
    release = make_release(keys, **kwargs)
    return json.dumps(encode(release.desired)).encode()


def mutated_desired(keys: Keys, change: Any) -> bytes:
    data = json.loads(valid_desired(keys))
    change(data)
    return json.dumps(data).encode()


MALFORMED: list[tuple[str, str, Any, str]] = [
    # (id, topic, payload or a function of keys -> payload, expected fragment of the warning)
    ("not json", desired_topic(), b"{not json", "payload is not JSON"),
    ("not utf-8", desired_topic(), b"\xff\xfe{}", "payload is not JSON"),
    ("json array", desired_topic(), b"[1, 2]", "payload must be a JSON object"),
    ("wrong v", desired_topic(), lambda k: mutated_desired(k, lambda d: d.update(v=2)), "unsupported protocol version"),
    ("unknown key", desired_topic(), lambda k: mutated_desired(k, lambda d: d.update(extra=1)), "unknown keys"),
    (
        "unknown nested key",
        desired_topic(),
        lambda k: mutated_desired(k, lambda d: d["manifest"].update(surprise=True)),
        "unknown keys",
    ),
    (
        "wrong type",
        desired_topic(),
        lambda k: mutated_desired(k, lambda d: d["directive"].update(signatures="none")),
        "expected a list",
    ),
    ("missing key", desired_topic(), lambda k: mutated_desired(k, lambda d: d.pop("manifest")), "missing key"),
    ("oversized", desired_topic(), b'{"v": 1, "pad": "' + b"x" * MAX_DESIRED_PAYLOAD + b'"}', "exceeds the limit"),
    ("command unknown", device_topic(TopicKind.CMD, DEVICE), b'{"v": 1, "name": "format-disk"}', "unknown command"),
    ("command not json", device_topic(TopicKind.CMD, DEVICE), b"ping", "payload is not JSON"),
    ("another device's desired", desired_topic(OTHER), lambda k: valid_desired(k, device_id=OTHER), "unexpected topic"),
    ("another device's cmd", device_topic(TopicKind.CMD, OTHER), b'{"v": 1, "name": "ping"}', "unexpected topic"),
    ("unknown device topic", f"ef/v1/devices/{DEVICE}/reboot", b"{}", "unknown device topic"),
    ("unknown prefix", "ef/v2/devices/x/desired", b"{}", "unknown topic"),
    ("not our protocol", "homeassistant/status", b"online", "unknown topic"),
    ("outbound kind", device_topic(TopicKind.STATE, DEVICE), b"{}", "unexpected topic"),
    ("want topic", want_topic(DEVICE, SHA), b"{}", "unexpected topic"),
    ("chunk with a bad sha", "ef/v1/artifacts/XYZ/chunks/0", b"data", "invalid sha256"),
    ("chunk with a bad index", f"ef/v1/artifacts/{SHA}/chunks/-1", b"data", "unknown topic"),
]


@pytest.mark.parametrize(("topic", "payload", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_is_logged_and_dropped(
    topic: str,
    payload: Any,
    fragment: str,
    service: AgentService,
    keys: Keys,
    published: list[tuple[str, bytes, bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = payload(keys) if callable(payload) else payload
    caplog.set_level(logging.WARNING, logger="agent.service")

    service.handle(Inbound(topic, body, retain=False))

    warnings = [r for r in caplog.records if r.name == "agent.service" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    message = warnings[0].getMessage()
    assert message.startswith(f"dropped a malformed message on {topic}")
    assert fragment in message
    assert service.updater.state is State.IDLE
    assert published == []  # nothing is reported about a message that was never understood


def test_a_cleared_retained_desired_state_is_ignored_quietly(
    service: AgentService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    service.handle(Inbound(desired_topic(), b"", retain=True))
    assert caplog.records == []
    assert service.updater.state is State.IDLE


def test_a_stray_chunk_for_an_unknown_file_is_ignored(service: AgentService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    service.handle(Inbound(chunk_topic(SHA, 3), b"bytes", retain=False))
    assert caplog.records == []
    assert service.updater.state is State.IDLE


def test_a_valid_desired_state_while_disconnected_starts_the_download_without_raising(
    service: AgentService, keys: Keys, published: list[tuple[str, bytes, bool]]
) -> None:
    release = make_release(keys)
    service.handle(Inbound(desired_topic(), json.dumps(encode(release.desired)).encode(), retain=True))

    assert service.updater.state is State.DOWNLOADING
    kinds = [parse_topic(topic).kind for topic, _, _ in published]
    assert TopicKind.EVENTS in kinds and TopicKind.STATE in kinds and TopicKind.WANT in kinds
    event = next(
        decode_payload(TopicKind.EVENTS, p) for t, p, _ in published if parse_topic(t).kind is TopicKind.EVENTS
    )
    assert isinstance(event, Event)
    assert (event.device_id, event.deployment_id, event.state) == (DEVICE, release.deployment_id, "downloading")
    wanted = {parse_topic(t).sha256 for t, _, _ in published if parse_topic(t).kind is TopicKind.WANT}
    assert wanted == {release.model_sha, release.eval_sha}
    # Offline, the report is queued for the next connection; the state and the requests are not, since the
    # next connection's hello and chunk requests repeat them.
    modes = service.offline_modes  # type: ignore[attr-defined]
    assert modes == {TopicKind.EVENTS: "queue", TopicKind.STATE: "drop", TopicKind.WANT: "drop"}
    # A subscription to each missing chunk, remembered for the next connection; never the file's wildcard.
    model_chunks = {f"ef/v1/artifacts/{release.model_sha}/chunks/{i}" for i in range(len(release.manifest.file("model").chunks))}
    assert set(service.link._subscriptions) >= model_chunks
    assert not any(f.endswith("/+") for f in service.link._subscriptions)


def test_a_rejected_desired_state_is_reported_while_disconnected(
    service: AgentService, keys: Keys, published: list[tuple[str, bytes, bool]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    payload = valid_desired(keys, release_key=keys.attacker)
    service.handle(Inbound(desired_topic(), payload, retain=True))

    assert service.updater.state is State.IDLE
    ((topic, body, retain),) = published
    event = decode_payload(TopicKind.EVENTS, body)
    assert parse_topic(topic).kind is TopicKind.EVENTS and not retain
    # A rejection, never the failure of the deployment the unverified message names.
    assert event.state == "rejected" and event.is_rejection
    assert event.deployment_id == "dep-1" and "no valid signature by a pinned release key" in event.reason
    assert any("rejected desired state" in r.getMessage() for r in caplog.records)

    service.handle(Inbound(desired_topic(), payload, retain=True))  # the retained copy on the next connect
    assert len(published) == 1  # reported once


def test_link_up_and_down_while_the_client_is_not_connected(
    service: AgentService, published: list[tuple[str, bytes, bool]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.service")
    service.link.connected.set()  # as paho's thread does before it reports LinkUp
    service.handle(LinkUp())
    service.link.connected.clear()
    service.handle(LinkDown("connection refused"))
    kinds = [(parse_topic(t).kind, retain) for t, _, retain in published]
    assert kinds == [(TopicKind.AVAILABILITY, True), (TopicKind.STATE, True)]
    state = decode_payload(TopicKind.STATE, published[1][1])
    assert state.hello is True and state.update_state == "idle" and state.active is None
    # The link logs connects and losses itself (with the retry delay); the service only notes the hand-off.
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.DEBUG, "link down: connection refused")]


def test_ping_publishes_the_state(service: AgentService, published: list[tuple[str, bytes, bool]]) -> None:
    service.link.connected.set()
    service.handle(Inbound(device_topic(TopicKind.CMD, DEVICE), b'{"v": 1, "name": "ping"}', retain=False))
    service.link.connected.clear()
    ((topic, _, retain),) = published
    assert parse_topic(topic).kind is TopicKind.STATE and retain


def test_publishing_to_a_disconnected_client_does_not_raise(service: AgentService) -> None:
    service.link.publish(device_topic(TopicKind.EVENTS, DEVICE), b"{}")
    service.link.subscribe("ef/v1/artifacts/+/chunks/+")
    service.link.unsubscribe("ef/v1/artifacts/+/chunks/+")


def test_a_flood_of_forged_desired_states_is_reported_sparingly_and_never_fills_the_outbox(
    service: AgentService, keys: Keys, published: list[tuple[str, bytes, bool]]
) -> None:
    """Each forged message differs (so none is a repeat), but they come from whoever can publish:
    they must not push real reports out of the bounded outbox, nor flood the server."""
    for version in range(1, 41):
        payload = valid_desired(keys, version=version, release_key=keys.attacker)
        service.handle(Inbound(desired_topic(), payload, retain=True))

    assert len(service.outbox) == 0
    ((_, body, _),) = published
    first = decode_payload(TopicKind.EVENTS, body)
    assert first.is_rejection and first.boot_id == f"{service.boot_id}-rejections" and first.seq == 1

    service._last_rejection_sent -= 10.0  # the interval has passed
    service.handle(Inbound(desired_topic(), valid_desired(keys, version=41, release_key=keys.attacker), retain=True))
    second = decode_payload(TopicKind.EVENTS, published[-1][1])
    assert second.seq == 2 and second.reason.endswith("(and 39 more rejected since the last report)")
    assert service.updater.state is State.IDLE


def test_trial_telemetry_carries_the_replaced_models_numbers(
    service: AgentService, published: list[tuple[str, bytes, bool]]
) -> None:
    previous = PreviousModel(model="kws", version=1, sha256=SHA, accuracy=0.91, p50_ms=0.8, p95_ms=1.1)
    service.telemetry("dep-2", BENCHMARK, 0.93, 120, previous)
    service.telemetry("dep-3", BENCHMARK, 0.93, 120, None)

    first, second = (decode_payload(TopicKind.TELEMETRY, body) for _, body, _ in published)
    assert isinstance(first, Telemetry) and isinstance(second, Telemetry)
    assert (first.deployment_id, first.accuracy, first.benchmark, first.previous) == ("dep-2", 0.93, BENCHMARK, previous)
    assert second.previous is None
    assert len(service.outbox) == 2  # kept until the server acknowledges them


def test_a_measure_command_is_fetched_timed_and_reported_beside_the_updater(
    service: AgentService, published: list[tuple[str, bytes, bool]], keys: Keys
) -> None:
    service.measurer.clock = lambda: NOW  # the signed fixtures' time
    service.measurer.start = ScriptedTrial()
    release = make_release(keys, version=5, profile=service.config.device.profile)
    order = sign_envelope(MeasureOrder(v=1, device_id=DEVICE, measurement_id="m-7",
                                       manifest_sha256=envelope_digest(release.manifest_env), issued=NOW,
                                       expires=NOW + 600), keys.director)
    command = Command(v=1, name="measure", order=order, manifest=release.manifest_env)
    service.handle(Inbound(device_topic(TopicKind.CMD, DEVICE), encode_payload(command), False))
    assert {topic for topic, _, _ in published} == {want_topic(DEVICE, release.model_sha),
                                                    want_topic(DEVICE, release.eval_sha)}
    for sha, blob in release.blobs().items():
        for index in range(-(-len(blob) // 64)):
            service.handle(Inbound(chunk_topic(sha, index), chunk_of(blob, index), False))
    service.tick()
    (telemetry,) = [decode_payload(TopicKind.TELEMETRY, p) for t, p, _ in published if t.endswith("/telemetry")]
    assert (telemetry.kind, telemetry.deployment_id, telemetry.benchmark) == ("measurement", "m-7", BENCHMARK)
    assert service.updater.state is State.IDLE and service.updater.record.deployment_id is None


def test_chunk_subscriptions_stay_while_the_updater_or_a_measurement_wants_them(
    service: AgentService, monkeypatch: pytest.MonkeyPatch
) -> None:
    subscribed: set[str] = set()
    monkeypatch.setattr(service.link, "subscribe", lambda *topics: subscribed.update(topics))
    monkeypatch.setattr(service.link, "unsubscribe", lambda *topics: subscribed.difference_update(topics))
    service.watch_chunks(SHA, [0, 1])
    service.watch_chunks(SHA, [1, 2], owner="measure")
    assert subscribed == {chunk_topic(SHA, i) for i in (0, 1, 2)}
    service.watch_chunks(SHA, (), owner="measure")  # the measurement ended: the updater still wants 0 and 1
    assert subscribed == {chunk_topic(SHA, i) for i in (0, 1)}
    service.watch_chunks(SHA, ())
    assert subscribed == set()
