"""Oversized messages at the broker, on a real Mosquitto: they never reach the agent or the server.

The decoder's size limits refuse an oversized payload, but only once the
whole message has arrived: a 200 MiB desired state would sit in a small
device's memory first. So each side tells the broker, when it connects, the
largest packet it takes (MQTT 5 Maximum Packet Size: ``MAX_AGENT_PACKET``, its
largest payload plus headers; ``MAX_SERVER_PACKET`` for the server), and the
broker drops a larger message for it instead of delivering it.
"""

from __future__ import annotations

import dataclasses
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import BrokerSection
from shared.canonical import canonical_json
from shared.codec import encode
from shared.messages import MAX_AGENT_PACKET, MAX_SERVER_PACKET
from shared.mqtt import BrokerAddress, Inbound
from shared.topics import TopicKind, all_devices_filter, device_topic
from tests.agent.fakes import install_first
from tests.agent.material import DEVICE
from tests.attacks.harness import AttackHarness, assert_attack_refused
from tests.attacks.ingest import assert_ingest_refused, ingest_bench

DESIRED = device_topic(TopicKind.DESIRED, DEVICE)


@pytest.fixture
def attacker(mosquitto: Any) -> Iterator[paho.Client]:
    """Any client of the broker (where it has no ACLs: anyone who reaches it)."""
    host, port = "127.0.0.1", mosquitto.port
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="attacker", protocol=paho.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()


def broker_said(mosquitto: Any, pattern: str) -> re.Match[str]:
    """The first line of the broker's log matching ``pattern``. Mosquitto buffers its log file (on a busy
    machine a line can wait there for many seconds), so the broker is stopped first: exiting flushes it."""
    mosquitto.stop()
    found = re.search(pattern, mosquitto.log.read_text() if mosquitto.log.exists() else "")
    assert found, f"the broker never logged {pattern!r}"
    return found


def received(inbox: queue.Queue[Any], topic: str, timeout: float = 10.0) -> list[Inbound]:
    """What reached the agent's link on ``topic``, once a message on it came (or ``timeout`` passed)."""
    got: list[Inbound] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not got:
        try:
            item = inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(item, Inbound) and item.topic == topic:
            got.append(item)
    time.sleep(0.2)  # anything right behind it
    while not inbox.empty():
        item = inbox.get()
        if isinstance(item, Inbound) and item.topic == topic:
            got.append(item)
    return got


def subscribed(inbox: queue.Queue[Any], attacker: paho.Client, topic: str, probe: bytes) -> None:
    """Until ``probe``, published on ``topic``, reaches ``inbox``: the link's subscription (sent when it
    connected) is in place, so what the attack publishes next is routed to it. The probe is taken out."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        attacker.publish(topic, probe, qos=1).wait_for_publish(10)
        if [m for m in received(inbox, topic, timeout=0.5) if m.payload == probe]:
            return
    raise AssertionError(f"nothing published on {topic} reached the link")


def test_oversized_message_for_the_agent_at_the_broker(
    harness: AttackHarness, mosquitto: Any, attacker: paho.Client
) -> None:
    """A retained 2 MiB desired state, then a small forgery: the agent's link receives the forgery only
    (and refuses it), the broker logs the drop."""
    h = harness
    install_first(h)
    h.config = dataclasses.replace(h.config, broker=BrokerSection(url=mosquitto.url))
    h.restart()
    link = h.service.link
    link.subscribe(DESIRED)
    link.start()
    assert link.wait_connected(10)
    huge = b'{"v":1,"pad":"' + b"x" * (2 << 20) + b'"}'
    assert len(huge) > MAX_AGENT_PACKET
    forged = h.release(version=2, release_key=h.keys.attacker)

    def flood(h: AttackHarness) -> None:
        small = canonical_json(encode(forged.desired))
        attacker.publish(DESIRED, huge, qos=1, retain=True).wait_for_publish(10)
        attacker.publish(DESIRED, small, qos=1).wait_for_publish(10)
        messages = received(h.service.inbox, DESIRED)
        assert [m.payload for m in messages] == [small]
        h.service.handle(messages[0])

    assert_attack_refused(h, flood, "rejected: no valid signature by a pinned release key")
    link.stop()
    dropped = broker_said(mosquitto, rf"Dropping too large outgoing PUBLISH for ef-agent-{DEVICE} \((\d+) bytes\)")
    assert int(dropped.group(1)) > len(huge)


def test_oversized_message_for_the_server_at_the_broker(tmp_path: Path, mosquitto: Any, attacker: paho.Client) -> None:
    """A 1 MiB "telemetry" report, then a small malformed one: the server's link receives the small one only
    (and drops it, storing nothing, going on)."""
    with ingest_bench(tmp_path / "data", BrokerAddress.parse(mosquitto.url)) as server:
        link = server.service.link
        link.subscribe(all_devices_filter(TopicKind.TELEMETRY))
        link.start()
        assert link.wait_connected(10)
        topic = device_topic(TopicKind.TELEMETRY, server.device)
        subscribed(server.service.inbox, attacker, topic, b'{"probe":1}')
        huge = b'{"v":1,"pad":"' + b"x" * (1 << 20) + b'"}'
        assert len(huge) > MAX_SERVER_PACKET
        small = b'{"v":1,"surprise":true}'

        attacker.publish(topic, huge, qos=1).wait_for_publish(10)
        attacker.publish(topic, small, qos=1).wait_for_publish(10)
        messages = received(server.service.inbox, topic)
        assert [m.payload for m in messages] == [small]
        assert_ingest_refused(server, messages[0], "$: unknown keys ['surprise']")
        link.stop()
    broker_said(mosquitto, r"Dropping too large outgoing PUBLISH for ef-server-\w+ \((\d+) bytes\)")
