"""Oversized and deeply nested payloads on every topic the agent reads: desired, cmd, ack and chunks.

Every JSON payload is decoded in one place (``shared/messages.py``
``decode_payload``): a size limit per topic (1 MiB for the desired state,
256 KiB for the rest) before a byte is parsed, then a nesting limit of 64
levels (``shared/canonical.py``), so the decoder and the re-encoding that
follows never meet Python's recursion limit. Chunks are raw bytes: one of
the wrong size is dropped unhashed, like any copy that does not match its
signed digest. The service logs the drop and its loop goes on.
"""

from __future__ import annotations

import json

import pytest

from shared.canonical import MAX_JSON_DEPTH
from shared.messages import MAX_CONTROL_PAYLOAD, MAX_DESIRED_PAYLOAD
from shared.topics import TopicKind, chunk_topic, device_topic
from tests.agent.fakes import install_first
from tests.agent.material import DEVICE, chunk_of
from tests.attacks.harness import AttackHarness, assert_attack_refused

LIMITS = {TopicKind.DESIRED: MAX_DESIRED_PAYLOAD, TopicKind.CMD: MAX_CONTROL_PAYLOAD, TopicKind.ACK: MAX_CONTROL_PAYLOAD}
JSON_TOPICS = list(LIMITS)


def dropped(kind: TopicKind, why: str) -> str:
    return f"dropped a malformed message on {device_topic(kind, DEVICE)}: {why}"


def nested(depth: int) -> bytes:
    """A message-shaped object whose one field nests ``depth`` arrays deep."""
    return b'{"v":1,"name":"ping","args":{"deep":' + b"[" * depth + b"]" * depth + b"}}"


@pytest.mark.parametrize("kind", JSON_TOPICS, ids=[k.value for k in JSON_TOPICS])
def test_oversized_payload_at_the_agent(harness: AttackHarness, kind: TopicKind) -> None:
    install_first(harness)
    limit = LIMITS[kind]
    body = json.dumps({"v": 1, "pad": "x" * limit}).encode()
    assert_attack_refused(harness, lambda h: h.deliver(device_topic(kind, DEVICE), body),
                          dropped(kind, f"payload of {len(body)} bytes exceeds the limit of {limit}"))


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 600, 100_000],
                         ids=["just past the limit", "past what re-encoding can recurse", "past the parser's recursion"])
@pytest.mark.parametrize("kind", JSON_TOPICS, ids=[k.value for k in JSON_TOPICS])
def test_deeply_nested_payload_at_the_agent(harness: AttackHarness, kind: TopicKind, depth: int) -> None:
    """600 levels used to parse, fail its signature check, and then crash the rejection's own re-encoding
    with a RecursionError (a traceback in the agent's log, the rejection never reported)."""
    install_first(harness)
    body = nested(depth - 2)  # the object and "args" are two levels
    assert len(body) <= LIMITS[kind]
    assert_attack_refused(harness, lambda h: h.deliver(device_topic(kind, DEVICE), body),
                          dropped(kind, f"payload nests deeper than {MAX_JSON_DEPTH} levels"))


def test_deeply_nested_signed_document(harness: AttackHarness) -> None:
    """The nesting inside a signed manifest, under the size limit: the shape the crash took."""
    install_first(harness)
    release = harness.release(version=2)
    deep: object = 1
    for _ in range(600):
        deep = {"a": deep}
    body = json.dumps({
        "v": 1,
        "directive": {"signed": release.directive_env.signed, "signatures": []},
        "manifest": {"signed": {**release.manifest_env.signed, "extra": deep}, "signatures": []},
    }).encode()
    assert_attack_refused(harness, lambda h: h.deliver_desired(body),
                          dropped(TopicKind.DESIRED, f"payload nests deeper than {MAX_JSON_DEPTH} levels"))


def test_oversized_chunk(harness: AttackHarness) -> None:
    """A chunk topic carries raw bytes: 2 MiB where the manifest signs 64 is dropped without hashing."""
    install_first(harness)
    release = harness.release(version=2)
    harness.updater.offer(release.desired)
    body = chunk_of(release.model, 0) + bytes(2 << 20)
    assert_attack_refused(harness, lambda h: h.deliver(chunk_topic(release.model_sha, 0), body),
                          "dropped a copy of model.tflite chunk 0 that does not match its signed sha256: asking again")
