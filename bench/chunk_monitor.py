"""An MQTT client that counts what the server published on the artifact chunk topics, per file.

Subscribes to ``ef/v1/artifacts/+/chunks/+`` with QoS 1 on its own
connection; paho's network thread only appends (topic, payload size, arrival
time), and ``bytes_by_file`` and ``arrivals`` parse the topics afterwards.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.mqtt import BrokerAddress
from shared.topics import PREFIX, parse_topic

CHUNK_FILTER = f"{PREFIX}/artifacts/+/chunks/+"


class MonitorError(Exception):
    """The monitor could not connect or subscribe."""


class ChunkMonitor:
    """An MQTT client that counts the payload bytes of every artifact chunk, per file."""

    def __init__(self, url: str | BrokerAddress) -> None:
        """``url``, or a device's broker address (the fleet broker: its identity, TLS and pinned CA)."""
        address = url if isinstance(url, BrokerAddress) else BrokerAddress.parse(url)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=address.username or f"bench-monitor-{os.getpid()}",
                                  protocol=paho.MQTTv5)
        address.configure(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._failed: list[str] = []
        self._received: list[tuple[str, int, float]] = []  # (topic, bytes, time.time()): appended on paho's thread
        self._address = (address.host, address.port)

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode,
                    props: Properties | None) -> None:
        if reason.is_failure:
            self._failed.append(f"connect: {reason}")
            self._subscribed.set()
            return
        client.subscribe(CHUNK_FILTER, qos=1)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: list[ReasonCode],
                      props: Properties) -> None:
        if any(r.value != 1 for r in reasons):  # 1: granted QoS 1
            self._failed.append(f"subscribe: {reasons}")
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self._received.append((message.topic, len(message.payload), time.time()))

    def start(self, timeout: float = 10.0) -> None:
        self.client.connect(*self._address)
        self.client.loop_start()
        if not self._subscribed.wait(timeout) or self._failed:
            raise MonitorError(f"the chunk monitor could not subscribe: {self._failed or 'timed out'}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def bytes_by_file(self) -> Counter[str]:
        counted: Counter[str] = Counter()
        for topic, size, _ in list(self._received):
            sha256 = parse_topic(topic).sha256
            assert sha256 is not None
            counted[sha256] += size
        return counted

    def arrivals(self, sha256: str, index: int) -> list[float]:
        """When each copy of one chunk arrived (``time.time()``)."""
        found = []
        for topic, _, at in list(self._received):
            parsed = parse_topic(topic)
            if parsed.sha256 == sha256 and parsed.chunk_index == index:
                found.append(at)
        return found
