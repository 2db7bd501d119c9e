"""Oversized and deeply nested payloads on every topic the server reads: state, availability, events,
telemetry and want.

Whoever can publish under a device's topics (the device itself, stolen
credentials, or anyone where the broker has no ACLs) reaches the server's
ingest. Each payload is decoded in one place (``shared/messages.py``
``decode_payload``) against a size limit (256 KiB) before it is parsed and a
nesting limit (64 levels) before it is decoded; a refused message is logged
as dropped, stores nothing, and does not spoil the batch it came in
(``server/service.py`` ``handle_batch``: one savepoint per message).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.canonical import MAX_JSON_DEPTH
from shared.messages import MAX_CONTROL_PAYLOAD
from shared.mqtt import Inbound
from shared.topics import TopicKind, device_topic, want_topic
from tests.agent.material import sha256_hex
from tests.attacks.ingest import IngestBench, assert_ingest_refused, ingest_bench

SERVER_TOPICS = [TopicKind.STATE, TopicKind.AVAILABILITY, TopicKind.EVENTS, TopicKind.TELEMETRY, TopicKind.WANT]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IngestBench]:
    with ingest_bench(tmp_path / "data") as bench:
        yield bench


def topic_of(kind: TopicKind, device: str) -> str:
    return want_topic(device, sha256_hex(b"any artifact")) if kind is TopicKind.WANT else device_topic(kind, device)


@pytest.mark.parametrize("kind", SERVER_TOPICS, ids=[k.value for k in SERVER_TOPICS])
def test_oversized_payload_at_the_server(server: IngestBench, kind: TopicKind) -> None:
    body = json.dumps({"v": 1, "device_id": server.device, "pad": "x" * MAX_CONTROL_PAYLOAD}).encode()
    assert_ingest_refused(server, Inbound(topic_of(kind, server.device), body, False),
                          f"payload of {len(body)} bytes exceeds the limit of {MAX_CONTROL_PAYLOAD}")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 600, 100_000],
                         ids=["just past the limit", "past what re-encoding can recurse", "past the parser's recursion"])
@pytest.mark.parametrize("kind", SERVER_TOPICS, ids=[k.value for k in SERVER_TOPICS])
def test_deeply_nested_payload_at_the_server(server: IngestBench, kind: TopicKind, depth: int) -> None:
    body = b'{"v":1,"deep":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    assert len(body) <= MAX_CONTROL_PAYLOAD
    assert_ingest_refused(server, Inbound(topic_of(kind, server.device), body, False),
                          f"payload nests deeper than {MAX_JSON_DEPTH} levels")
