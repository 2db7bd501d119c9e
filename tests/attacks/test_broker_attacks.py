"""Attacks on the broker, against Mosquitto configured exactly as ``edgefleet init`` and ``edgefleet broker`` do.

Each test is one attack from a network client. Mosquitto 2 answers a denied
SUBSCRIBE with "granted" and drops a denied PUBLISH silently, so every refusal
is asserted by what arrives (or not) at a legitimate client, with a control
message that does arrive to show the path works.

- anonymous client; wrong password; a removed device's credentials; plain MQTT
  to the TLS listener; a client that does not pin the fleet CA (and a server
  certificate for another name)
- a device publishing on another device's state, availability, events,
  telemetry and want topics, and on server-only topics (desired, cmd, chunks,
  root)
- a device subscribing to another device's desired state and commands, to
  everything, and to the other device's reports
- a device taking over another device's session by its client id
- a removed device is disconnected at once and cannot come back
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import load_config
from server.broker_setup import BrokerLayout, server_address
from shared.mqtt import BrokerAddress
from tests.e2e.fleet import cli
from tests.fleet_broker import FleetBroker

pytestmark = pytest.mark.e2e

SETTLE_S = 0.5  # how long a message that would be delivered takes at most on loopback


@dataclass
class Client:
    """One MQTT 5 client: what the broker answered, what it delivered, and whether it dropped us."""

    address: BrokerAddress
    client_id: str
    connack: list[str] = field(default_factory=list)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    error: str = ""
    connected: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        self.address.configure(self.paho)
        self.paho.on_connect = self._on_connect
        self.paho.on_message = lambda c, u, m: self.received.append((m.topic, bytes(m.payload)))
        self.paho.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack.append(str(reason))
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnects.append(str(reason))
        self.connected.clear()
        self.answered.set()

    def connect(self, timeout: float = 10.0) -> Client:
        try:
            self.paho.connect(self.address.host, self.address.port, keepalive=10)
        except (OSError, ssl.SSLError) as exc:
            self.error = str(exc)
            return self
        self.paho.loop_start()
        self.answered.wait(timeout)
        return self

    def subscribe(self, *filters: str) -> None:
        for topic_filter in filters:
            self.paho.subscribe(topic_filter, qos=1)
        time.sleep(SETTLE_S)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.paho.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def topics(self) -> set[str]:
        return {topic for topic, _ in self.received}

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@dataclass
class SecuredFleet:
    data_dir: Path
    broker: FleetBroker
    devices: dict[str, BrokerAddress]
    ids: dict[str, str]
    configs: dict[str, Path]
    clients: list[Client] = field(default_factory=list)

    def client(self, address: BrokerAddress, client_id: str) -> Client:
        self.clients.append(Client(address, client_id).connect())
        return self.clients[-1]

    def server(self) -> Client:
        return self.client(server_address(BrokerLayout(self.data_dir / "broker"), self.broker.url), "edgefleet-server")

    def device(self, name: str) -> Client:
        return self.client(self.devices[name], f"ef-agent-{self.ids[name]}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredFleet]:
    root = tmp_path_factory.mktemp("secured")
    data_dir = root / "server"
    broker = FleetBroker(data_dir)
    cli("init", "--data-dir", str(data_dir), "--release-key", "online", "--broker-host", "127.0.0.1", "--broker-listen", broker.listen)
    broker.start()
    devices, ids, configs = {}, {}, {}
    try:
        for name in ("cam-a", "cam-b", "cam-c"):
            configs[name] = root / name / "agent.toml"
            cli("device", "register", name, "--profile", "x86-64", "--data-dir", str(data_dir), "--out",
                str(configs[name]))
            config = load_config(configs[name])
            devices[name], ids[name] = config.broker_address(), config.device.id
        yield SecuredFleet(data_dir, broker, devices, ids, configs)
    finally:
        broker.stop()


@pytest.fixture
def net(fleet: SecuredFleet) -> Iterator[SecuredFleet]:
    """The fleet, closing every client a test opened when it ends: a client left running would reconnect
    and take over the next test's session of the same identity."""
    yield fleet
    for client in fleet.clients:
        client.close()
    fleet.clients.clear()


def device_topic(fleet: SecuredFleet, name: str, kind: str) -> str:
    return f"ef/v1/devices/{fleet.ids[name]}/{kind}"


def test_the_registered_config_connects_over_tls_with_its_own_identity(net: SecuredFleet) -> None:
    address = net.devices["cam-a"]
    assert address.tls and address.ca_file and address.username == net.ids["cam-a"] and address.password
    assert (net.configs["cam-a"].stat().st_mode & 0o777) == 0o600  # it holds the device's password
    assert net.device("cam-a").connack == ["Success"]


def test_an_anonymous_client_is_refused(net: SecuredFleet) -> None:
    anonymous = net.client(replace(net.devices["cam-a"], username=None, password=None), "anyone")
    assert anonymous.connack == ["Not authorized"]


def test_a_wrong_password_is_refused(net: SecuredFleet) -> None:
    guess = net.client(replace(net.devices["cam-a"], password="guessed"), "guesser")
    assert guess.connack == ["Not authorized"]


def test_plain_mqtt_to_the_tls_listener_gets_nowhere(net: SecuredFleet) -> None:
    plain = net.client(replace(net.devices["cam-a"], tls=False, ca_file=None), "plain")
    assert not plain.connected.is_set() and plain.connack == []


def tls_handshake(net: SecuredFleet, context: ssl.SSLContext, server_hostname: str) -> None:
    with socket.create_connection(("127.0.0.1", net.broker.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=server_hostname):
        pass


def test_a_client_that_does_not_pin_the_fleet_ca_does_not_trust_the_broker(net: SecuredFleet) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        tls_handshake(net, ssl.create_default_context(), "127.0.0.1")  # the system's CAs only
    tls_handshake(net, ssl.create_default_context(cafile=net.devices["cam-a"].ca_file), "127.0.0.1")  # pinned: fine


def test_the_broker_certificate_names_only_the_hosts_init_was_given(net: SecuredFleet) -> None:
    pinned = ssl.create_default_context(cafile=net.devices["cam-a"].ca_file)
    tls_handshake(net, pinned, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        tls_handshake(net, pinned, "broker.attacker.example")


@pytest.mark.parametrize("kind", ["state", "availability", "events", "telemetry", "want/" + "ab" * 32])
def test_a_device_cannot_publish_on_another_devices_topic(net: SecuredFleet, kind: str) -> None:
    server = net.server()
    server.subscribe("ef/v1/devices/#")
    attacker = net.device("cam-a")
    attacker.publish(device_topic(net, "cam-b", kind), b'{"forged": true}')
    attacker.publish(device_topic(net, "cam-a", kind), b'{"own": true}')  # the control: its own topic arrives
    time.sleep(SETTLE_S)
    assert server.topics() == {device_topic(net, "cam-a", kind)}


@pytest.mark.parametrize("topic", ["desired", "cmd", "artifacts", "root"])
def test_a_device_cannot_publish_on_what_only_the_server_sends(net: SecuredFleet, topic: str) -> None:
    target = {"desired": device_topic(net, "cam-b", "desired"), "cmd": device_topic(net, "cam-b", "cmd"),
              "artifacts": f"ef/v1/artifacts/{'cd' * 32}/chunks/0", "root": "ef/v1/root"}[topic]
    victim = net.device("cam-b")
    victim.subscribe(target)
    net.device("cam-a").publish(target, b"forged", retain=topic == "desired")
    net.server().publish(target, b"genuine")  # the control: the server may
    time.sleep(SETTLE_S)
    assert victim.received == [(target, b"genuine")]


def test_a_device_cannot_read_another_devices_desired_state_commands_or_acks(net: SecuredFleet) -> None:
    server = net.server()
    server.publish(device_topic(net, "cam-b", "desired"), b"for b only", retain=True)
    server.publish(device_topic(net, "cam-a", "desired"), b"for a", retain=True)
    spy = net.device("cam-a")
    spy.subscribe(*(device_topic(net, name, kind) for name in ("cam-a", "cam-b") for kind in ("desired", "cmd", "ack")),
                  "ef/v1/#", "#")
    for kind in ("cmd", "ack"):  # not retained: sent once everyone listens
        server.publish(device_topic(net, "cam-b", kind), b"for b only")
        server.publish(device_topic(net, "cam-a", kind), b"for a")
    time.sleep(SETTLE_S)
    # its own desired state (retained), commands and report acknowledgements arrive; nothing of b's
    assert spy.topics() == {device_topic(net, "cam-a", kind) for kind in ("desired", "cmd", "ack")}


def test_a_device_cannot_read_another_devices_reports(net: SecuredFleet) -> None:
    spy = net.device("cam-a")
    spy.subscribe("ef/v1/devices/+/state", device_topic(net, "cam-b", "telemetry"))
    net.device("cam-b").publish(device_topic(net, "cam-b", "state"), b"b's state")
    time.sleep(SETTLE_S)
    assert spy.received == []


def test_artifact_chunks_and_the_root_reach_every_device(net: SecuredFleet) -> None:
    chunk = f"ef/v1/artifacts/{'ef' * 32}/chunks/3"
    readers = [net.device("cam-a"), net.device("cam-b")]
    for reader in readers:
        reader.subscribe(f"ef/v1/artifacts/{'ef' * 32}/chunks/+", "ef/v1/root")
    server = net.server()
    server.publish(chunk, b"chunk bytes")
    server.publish("ef/v1/root", b"root")
    time.sleep(SETTLE_S)
    assert all(sorted(reader.topics()) == sorted([chunk, "ef/v1/root"]) for reader in readers)


def test_a_device_cannot_take_over_another_devices_session_by_its_client_id(net: SecuredFleet) -> None:
    victim = net.device("cam-b")
    assert victim.connected.is_set()
    impostor = net.client(net.devices["cam-a"], f"ef-agent-{net.ids['cam-b']}")  # b's client id, a's password
    assert impostor.connack == ["Success"]  # it connects, but as itself: the broker uses its username as client id
    time.sleep(SETTLE_S)
    assert victim.connected.is_set() and victim.disconnects == []


def test_a_removed_device_is_disconnected_at_once_and_cannot_connect_again(net: SecuredFleet) -> None:
    device = net.device("cam-c")
    assert device.connected.is_set()
    cli("device", "remove", "cam-c", "--data-dir", str(net.data_dir))
    deadline = time.monotonic() + 5
    while device.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not device.connected.is_set(), "the removed device is still connected"
    again = net.client(net.devices["cam-c"], "cam-c-again")
    assert again.connack == ["Not authorized"]
    assert net.device("cam-a").connack == ["Success"]  # the others are untouched
