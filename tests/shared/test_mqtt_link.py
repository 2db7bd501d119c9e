"""shared.mqtt.MqttLink says what happens to its connection, truthfully, against real sockets and a real Mosquitto.

"retrying in N s" must be what paho then waits: the tests time the attempts.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.errors import TransportError
from shared.mqtt import BrokerAddress, Inbound, LinkUp, MqttLink, probe_broker

LOGGER = "shared.mqtt"


def local(port: int) -> BrokerAddress:
    return BrokerAddress("127.0.0.1", port)


def closed_port() -> int:
    from server.broker import free_port

    return free_port()


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    started: list[MqttLink] = []
    yield started
    for link in started:
        link.stop()


def start(links: list[MqttLink], address: BrokerAddress, **options: Any) -> MqttLink:
    link = MqttLink(address, client_id=f"test-{len(links)}-{time.monotonic_ns()}", inbox=queue.Queue(), **options)
    links.append(link)
    link.start()
    return link


def wait_for_records(caplog: pytest.LogCaptureFixture, count: int, timeout: float,
                     keep: Callable[[logging.LogRecord], bool] = lambda r: True) -> list[logging.LogRecord]:
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in caplog.records if r.name == LOGGER and keep(r)]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


RETRY = re.compile(r"retrying in (\d+) s$")


def test_a_dead_broker_is_reported_once_per_attempt_with_the_real_retry_delay(
    links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = closed_port()
    start(links, local(port), reconnect_delay_s=(1, 2))

    records = wait_for_records(caplog, 3, timeout=15)

    messages = [r.getMessage() for r in records[:3]]
    url = f"mqtt://127.0.0.1:{port}"
    assert all(r.levelno == logging.WARNING for r in records[:3])
    # The first wait is doubled: paho waits once in its connect phase and once more before it retries.
    assert messages == [f"cannot reach broker {url} (Connection refused), retrying in {n} s" for n in (2, 2, 2)]
    for before, after in itertools.pairwise(records[:3]):
        announced = int(RETRY.search(before.getMessage()).group(1))  # type: ignore[union-attr]
        assert after.created - before.created == pytest.approx(announced, abs=0.6)


def test_the_back_off_doubles_up_to_its_cap_and_is_what_paho_waits() -> None:
    link = MqttLink(local(closed_port()), client_id="never-started", inbox=queue.Queue(), reconnect_delay_s=(1, 4))
    # The schedule as the callbacks advance it (the link is not started: nothing else moves it).
    delays = []
    for _ in range(5):
        delays.append(link._retry_in())
        assert (link._client._reconnect_min_delay, link._client._reconnect_max_delay) == (delays[-1],) * 2
    assert delays == [1, 2, 4, 4, 4]
    assert link._retry_in(waits_twice=True) == 8


def test_connected_lost_and_back_against_a_real_broker(
    mosquitto: Any, links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    from server.broker import Mosquitto

    caplog.set_level(logging.INFO, logger=LOGGER)
    link = start(links, local(mosquitto.port))
    assert link.wait_connected(10)
    url = mosquitto.url
    (connected,) = wait_for_records(caplog, 1, timeout=5)
    assert (connected.levelno, connected.getMessage()) == (logging.INFO, f"connected to {url}")

    mosquitto.kill()
    records = wait_for_records(caplog, 3, timeout=10)
    lost, unreachable = records[1], records[2]
    assert lost.levelno == logging.WARNING
    assert re.fullmatch(rf"lost the connection to {re.escape(url)} \(.+\), reconnecting in 1 s", lost.getMessage())
    assert unreachable.getMessage() == f"cannot reach broker {url} (Connection refused), retrying in 2 s"
    assert unreachable.created - lost.created == pytest.approx(1, abs=0.6)

    again = Mosquitto(mosquitto.workdir, port=mosquitto.port).start()
    try:
        back = wait_for_records(caplog, 1, timeout=10, keep=lambda r: r.created > unreachable.created
                                and r.getMessage().startswith("connected"))
        assert [r.getMessage() for r in back] == [f"connected to {url}"]
        assert back[0].created - unreachable.created == pytest.approx(2, abs=0.6)  # as announced
    finally:
        link.stop()
        again.stop()


def test_a_broker_that_refuses_is_named_with_its_reason(
    tmp_path: Path, links: list[MqttLink], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.broker
    from server.broker import Mosquitto

    monkeypatch.setattr(server.broker, "CONFIG", server.broker.CONFIG.replace("allow_anonymous true",
                                                                              "allow_anonymous false"))
    broker = Mosquitto(tmp_path / "broker").start()
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        link = start(links, local(broker.port))
        records = wait_for_records(caplog, 2, timeout=10)
        link.stop()
    finally:
        broker.stop()
    assert [r.getMessage() for r in records[:2]] == [
        f"broker {broker.url} refused the connection (Not authorized), retrying in {n} s" for n in (1, 2)
    ]
    assert not link.connected.is_set()


def test_stopping_the_link_is_not_reported_as_a_lost_connection(
    mosquitto: Any, links: list[MqttLink], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    link = start(links, local(mosquitto.port))
    assert link.wait_connected(10)
    link.stop()
    time.sleep(0.3)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [f"connected to {mosquitto.url}"]


# -- probe_broker (edgefleet agent check-config --connect) --------------------------------------------


def test_probe_connects_and_leaves_no_session(mosquitto: Any) -> None:
    probe_broker(local(mosquitto.port), client_id="probe-1", timeout=5)


def test_probe_of_a_closed_port() -> None:
    port = closed_port()
    with pytest.raises(TransportError, match=re.escape(f"cannot reach broker mqtt://127.0.0.1:{port} "
                                                       "(Connection refused)")):
        probe_broker(local(port), client_id="probe-2", timeout=2)


def test_probe_of_a_port_that_never_answers_gives_up_in_time() -> None:
    import socket

    with socket.socket() as silent:  # accepts the TCP connection (backlog) but never speaks MQTT
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(TransportError, match="no answer to the connect within 1 s"):
            probe_broker(local(port), client_id="probe-3", timeout=1)
        assert time.monotonic() - started < 3


def _receive(inbox: queue.Queue[Any], seconds: float) -> list[Inbound]:
    received: list[Inbound] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            item = inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(item, Inbound):
            received.append(item)
    return received


def _unacknowledged_deliveries(links: list[MqttLink], broker: Any, **options: Any) -> int:
    """How many of 400 QoS 1 messages a manual-ack link gets before it acknowledges any."""
    inbox: queue.Queue[Any] = queue.Queue()
    receiver = MqttLink(local(broker.port), client_id=f"receiver-{time.monotonic_ns()}", inbox=inbox,
                        manual_ack=True, **options)
    links.append(receiver)
    receiver.subscribe("bench/window")
    receiver.start()
    assert receiver.wait_connected(10)
    sender = start(links, local(broker.port))
    assert sender.wait_connected(10)
    time.sleep(0.3)  # the receiver's subscription is in place
    for i in range(400):
        sender.publish("bench/window", str(i).encode())
    return len(_receive(inbox, 3))  # long enough for 400 small messages, whatever the window


def test_receive_maximum_widens_what_the_broker_sends_before_an_acknowledgement(
    links: list[MqttLink], mosquitto: Any
) -> None:
    """The server acknowledges after its batch commits: without a wider window Mosquitto stops at its
    max_inflight_messages (100 in every config edgefleet writes), and a batch never holds more."""
    assert _unacknowledged_deliveries(links, mosquitto) == 100
    assert _unacknowledged_deliveries(links, mosquitto, receive_maximum=300) == 300


def test_acknowledging_a_batch_at_once_counts_every_message(links: list[MqttLink], mosquitto: Any) -> None:
    """ack_all (one write for a batch's PUBACKs, as the server sends them): the broker sends the rest once the
    first window is acknowledged, and after a reconnect to the same session it delivers nothing again."""
    client_id = f"receiver-{time.monotonic_ns()}"

    def receiver() -> tuple[MqttLink, queue.Queue[Any]]:
        inbox: queue.Queue[Any] = queue.Queue()
        link = MqttLink(local(mosquitto.port), client_id=client_id, inbox=inbox, manual_ack=True,
                        session_expiry_s=60)
        links.append(link)
        link.subscribe("bench/acks")
        link.start()
        assert link.wait_connected(10)
        return link, inbox

    first, inbox = receiver()
    sender = start(links, local(mosquitto.port))
    assert sender.wait_connected(10)
    time.sleep(0.3)
    for i in range(250):
        sender.publish("bench/acks", str(i).encode())
    window = _receive(inbox, 1.5)
    assert len(window) == 100  # the broker's max_inflight_messages: it waits for acknowledgements
    first.ack_all(window)
    rest = _receive(inbox, 1.5)
    first.ack_all(rest)
    assert [m.payload for m in window + rest] == [str(i).encode() for i in range(250)]  # in order, each once
    time.sleep(0.5)
    first.stop()

    _, again = receiver()  # the same session: whatever it had not acknowledged would come again now
    assert _receive(again, 1.5) == []


def test_several_filters_in_one_call_are_held_dropped_and_renewed_on_reconnect(
    links: list[MqttLink], mosquitto: Any
) -> None:
    """subscribe/unsubscribe with several filters (an agent's one topic per missing chunk): what arrives is
    exactly what the link still holds, also after the broker restarted and the link subscribed anew."""
    from server.broker import Mosquitto

    inbox: queue.Queue[Any] = queue.Queue()
    link = MqttLink(local(mosquitto.port), client_id=f"chunks-{time.monotonic_ns()}", inbox=inbox)
    links.append(link)
    link.subscribe("file/0", "file/1", "file/2", "file/3")  # before the first connection: sent on connect
    link.start()
    assert link.wait_connected(10)
    link.subscribe("file/4", "file/5")
    link.unsubscribe("file/1", "file/5", "file/never")

    def delivered() -> list[str]:
        sender = start(links, local(mosquitto.port))
        assert sender.wait_connected(10)
        time.sleep(0.3)  # the receiver's subscriptions travel on its own connection
        for i in range(7):
            sender.publish(f"file/{i}", b"x")
        return sorted(m.topic for m in _receive(inbox, 1.0))

    assert delivered() == ["file/0", "file/2", "file/3", "file/4"]

    mosquitto.kill()
    again = Mosquitto(mosquitto.workdir, port=mosquitto.port).start()
    try:
        deadline = time.monotonic() + 15
        while not isinstance(inbox.get(timeout=max(0.0, deadline - time.monotonic())), LinkUp):
            pass  # the connection lost, then back: the link subscribed anew (a new broker has no session)
        assert delivered() == ["file/0", "file/2", "file/3", "file/4"]
    finally:
        for started in links:
            started.stop()
        again.stop()
