"""The minor protocol version: a newer peer's optional fields are skipped, a same-minor unknown key is not."""

from __future__ import annotations

import dataclasses
import json

import pytest

from shared import PROTOCOL_MINOR, PROTOCOL_VERSION
from shared.errors import ProtocolError
from shared.histogram import LatencyHistogram
from shared.messages import (
    Availability,
    DeviceState,
    Directive,
    Gates,
    ServingReport,
    Telemetry,
    decode_payload,
    encode_payload,
)
from shared.protocol import MINOR_KEY, decode_versioned, encode_versioned, minor_of
from shared.topics import TopicKind
from tests.shared.factories import make_manifest as manifest

NEWER = PROTOCOL_MINOR + 1


def state(**changes: object) -> DeviceState:
    base = DeviceState(v=PROTOCOL_VERSION, device_id="cam-1", boot_id="b", runtime="ai-edge-litert",
                       runtime_version="2.3", update_state="idle", deployment_id=None, directive_seq=0, active=None)
    return dataclasses.replace(base, **changes)


def serving_telemetry() -> Telemetry:
    empty = LatencyHistogram().to_wire()
    report = ServingReport(model="m", version=1, sha256="a" * 64, quantization="int8", runtime="r", threads=1,
                           source="traffic", start=1.0, end=2.0, calls=0, errors=0, samples=0, invoke=empty,
                           e2e=empty)
    return Telemetry(v=PROTOCOL_VERSION, device_id="cam-1", boot_id="b", seq=1, deployment_id=None, kind="serving",
                     ts=2.0, serving=report)


def test_a_message_that_sets_no_newer_field_is_what_older_peers_always_read() -> None:
    for message in (state(), Availability(v=PROTOCOL_VERSION, online=True), manifest()):
        assert minor_of(message) == 0
        assert MINOR_KEY not in encode_versioned(message)


def test_a_message_that_sets_a_newer_field_says_its_minor() -> None:
    assert minor_of(serving_telemetry()) == 1
    assert json.loads(encode_payload(serving_telemetry()))[MINOR_KEY] == 1
    assert encode_versioned(dataclasses.replace(manifest(), threads=4))[MINOR_KEY] == 1
    assert decode_payload(TopicKind.TELEMETRY, encode_payload(serving_telemetry())) == serving_telemetry()


def test_a_directive_says_minor_3_only_when_its_gates_set_a_latency_slack() -> None:
    def directive(slack: float | None) -> Directive:
        gates = Gates(min_accuracy=0.9, max_latency_ratio=1.5, latency_slack_ms=slack)
        return Directive(v=PROTOCOL_VERSION, device_id="cam-1", deployment_id="dep", rollout_id="r", seq=1,
                         manifest_sha256="a" * 64, gates=gates, issued=1, expires=2)

    assert MINOR_KEY not in encode_versioned(directive(None))
    encoded = encode_versioned(directive(0.05))
    assert (encoded[MINOR_KEY], encoded["gates"]["latency_slack_ms"]) == (3, 0.05)
    assert decode_versioned(Directive, encoded) == directive(0.05)


def test_a_newer_minors_unknown_keys_are_skipped_at_every_level() -> None:
    data = json.loads(encode_payload(state(active=None)))
    data.update({MINOR_KEY: NEWER, "battery_percent": 81, "radio": {"rssi": -60}})
    assert decode_payload(TopicKind.STATE, json.dumps(data).encode()) == state()

    signed = encode_versioned(manifest())
    signed[MINOR_KEY] = NEWER
    signed["delta_from"] = "b" * 64
    signed["files"][0]["compression"] = "zstd"  # nested: a newer FileEntry field
    assert decode_versioned(type(manifest()), signed) == manifest()


@pytest.mark.parametrize("minor", [0, PROTOCOL_MINOR])
def test_an_unknown_key_from_this_minor_or_an_older_one_is_refused(minor: int) -> None:
    data = json.loads(encode_payload(state()))
    data.update({MINOR_KEY: minor, "battery_percent": 81})
    with pytest.raises(ProtocolError, match="unknown keys"):
        decode_payload(TopicKind.STATE, json.dumps(data).encode())
    nested = encode_versioned(manifest())
    nested["files"][0]["compression"] = "zstd"
    with pytest.raises(ProtocolError, match="unknown keys"):
        decode_versioned(type(manifest()), nested)


@pytest.mark.parametrize("minor", [-1, "2", True, 1.5, None, 2**63])
def test_a_minor_that_is_not_a_non_negative_integer_is_refused(minor: object) -> None:
    data = json.loads(encode_payload(state()))
    data[MINOR_KEY] = minor
    with pytest.raises(ProtocolError, match="minor"):
        decode_payload(TopicKind.STATE, json.dumps(data).encode())


def test_a_newer_minor_still_needs_every_required_key_and_the_same_major() -> None:
    data = json.loads(encode_payload(state()))
    data[MINOR_KEY] = NEWER
    del data["boot_id"]
    with pytest.raises(ProtocolError, match="missing key 'boot_id'"):
        decode_payload(TopicKind.STATE, json.dumps(data).encode())
    data = json.loads(encode_payload(state()))
    data.update({MINOR_KEY: NEWER, "v": PROTOCOL_VERSION + 1})
    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        decode_payload(TopicKind.STATE, json.dumps(data).encode())
