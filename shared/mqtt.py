"""The paho-mqtt adapter both sides use (MQTT 5, paho callback API v2).

paho callbacks run on its network thread and only hand off: each message
becomes an immutable ``Inbound`` record, each connection change a
``LinkUp``/``LinkDown``, put on the owner's queue. The owner's single loop
does all the work. Subscriptions are remembered and renewed on every
reconnect; paho reconnects by itself and re-sends the QoS 1 messages it still
holds.

The link says what happens to the connection at the default level of the
long-running commands: "connected to mqtt://host:port" (info), and for every
failed attempt "cannot reach broker mqtt://host:port (reason), retrying in
N s" (warning), or that the broker refused the connection, or that a working
connection was lost. N is the truth because the link sets it: before each of
paho's waits (which always follow its ``on_connect_fail`` or
``on_disconnect``) it tells paho the next delay of its own back-off (1 s,
doubling to 10 s, back to 1 s once connected). The back-off is also what keeps
these lines from flooding a log while the broker is away. Logging is the only
thing besides the hand-off that these callbacks do.

Two kinds of owner: an agent connects with a clean session and acknowledges
on receipt; the server keeps a persistent session (``session_expiry_s``) and
acknowledges each message only after it committed what the message said
(``manual_ack``), so a crash between the two makes the broker deliver it
again instead of losing it.
"""

from __future__ import annotations

import logging
import queue
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from shared.errors import ConfigError, TransportError

logger = logging.getLogger(__name__)

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 10


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool
    qos: int = 0
    mid: int = 0
    connection: int = 0  # which connection delivered it: an acknowledgement only counts on that one


@dataclass(frozen=True)
class LinkUp:
    session_present: bool = False


@dataclass(frozen=True)
class LinkDown:
    reason: str



SCHEMES = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to prove who we are to it.

    ``mqtts://`` is MQTT over TLS: the broker's certificate must chain to ``ca_file`` (the fleet's private CA,
    pinned) or, without one, to the system's CAs, and name the host. ``cert_file``/``key_file`` add a client
    certificate (mTLS). Credentials never appear in ``url()``, so logs never show them.
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def parse(
        cls, url: str, *, username: str | None = None, password: str | None = None, ca_file: str | None = None,
        cert_file: str | None = None, key_file: str | None = None,
    ) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ConfigError(f"broker must look like mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}")
        try:
            port = parts.port or SCHEMES[parts.scheme]
        except ValueError as exc:
            raise ConfigError(f"bad port in broker address {url!r}") from exc
        tls = parts.scheme == "mqtts"
        if not tls and (ca_file or cert_file or key_file):
            raise ConfigError(f"a CA or client certificate needs an mqtts:// broker address, got {url!r}")
        if bool(cert_file) != bool(key_file):
            raise ConfigError("a client certificate needs both cert_file and key_file")
        return cls(parts.hostname, port, username or parts.username, password or parts.password, tls,
                   ca_file or None, cert_file or None, key_file or None)

    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def configure(self, client: paho.Client) -> None:
        """Credentials and TLS on a paho client; ConfigError when a certificate or key cannot be loaded."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        context = self.ssl_context()
        if context is not None:
            client.tls_set_context(context)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``mqtts://`` (None for ``mqtt://``); ConfigError names a file it cannot load."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the broker's CA certificate {self.ca_file}: {_reason(exc)}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the client certificate {self.cert_file} with key {self.key_file}: {_reason(exc)}"
                ) from exc
        return context


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


def connect_error_text(exc: BaseException | None) -> str:
    """Why a connection attempt failed, as a short phrase ("Connection refused", "timed out")."""
    if exc is None:
        return "unknown error"
    if isinstance(exc, ssl.SSLCertVerificationError):  # retrying will not help: say what to fix
        return f"its TLS certificate is not trusted: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _Client(paho.Client):
    """paho's client, remembering why its last connection attempt failed (``on_connect_fail`` is not told)."""

    last_connect_error: OSError | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_connect_error = exc
            raise

    def ack_all(self, mids: Sequence[int]) -> None:
        """PUBACK each QoS 1 message of ``mids`` (``manual_ack``), all in one write. paho's ``ack`` queues
        each as a packet of its own, waking its network thread and making a system call for each: for a
        server acknowledging batches of hundreds, most of its acknowledging time. (A PUBACK of remaining
        length 2, reason code omitted, means success: what paho itself sends.)"""
        if mids:
            acks = b"".join(struct.pack("!BBH", paho.PUBACK, 2, mid) for mid in mids)
            self._packet_queue(paho.PUBACK, acks, 0, 1)


class NetworkLoop(Protocol):
    """Drives the network side of many links from one thread (``agent/simulate/network.py``) instead of a
    paho thread per link: it connects, reads, writes, keeps alive and reconnects each client it holds."""

    def attach(self, client: paho.Client, link: MqttLink) -> None: ...

    def detach(self, client: paho.Client) -> None: ...


class MqttLink:
    def __init__(
        self,
        broker: BrokerAddress,
        client_id: str,
        inbox: queue.Queue[Any],
        *,
        will: Will | None = None,
        session_expiry_s: int = 0,
        manual_ack: bool = False,
        reconnect_delay_s: tuple[int, int] = (RECONNECT_MIN_S, RECONNECT_MAX_S),
        max_packet_bytes: int | None = None,
        receive_maximum: int | None = None,
        network: NetworkLoop | None = None,
    ) -> None:
        """``max_packet_bytes``: the largest packet the broker may deliver to this client (MQTT 5 Maximum
        Packet Size); a broker drops a larger message for it instead of making it hold the whole thing in
        memory before the decoder's size limit refuses it. ``receive_maximum``: how many QoS 1 messages
        the broker may have sent this client unacknowledged (MQTT 5 Receive Maximum; the broker's own
        limit applies when this is None). ``network``: a loop shared with other links (a simulated fleet)
        instead of paho's own thread for this one."""
        self.broker = broker
        self._network = network
        self.retry_wait_s = float(reconnect_delay_s[0])  # the wait last announced (see _retry_in)
        self._max_packet_bytes = max_packet_bytes
        self._receive_maximum = receive_maximum
        self._inbox = inbox
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._connection = 0
        self._session_expiry_s = session_expiry_s
        self._manual_ack = manual_ack
        self._min_delay, self._max_delay = reconnect_delay_s
        # Touched by paho's thread only, once started: the next wait, and what the next on_disconnect reports.
        self._next_delay = self._min_delay
        self._first_attempt = True  # paho waits twice after a failed first attempt (see _on_connect_fail)
        self._refused: str | None = None
        self._was_connected = False
        self._stopping = False
        self._client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=manual_ack,
        )
        self._client.max_queued_messages_set(0)  # keep QoS 1 messages published while offline
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(min_delay=self._min_delay, max_delay=self._min_delay)
        broker.configure(self._client)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho thread: hand off only ---------------------------------------

    def _retry_in(self, *, waits_twice: bool = False) -> int:
        """The wait paho starts next, in seconds: set here, so what the log says is what happens."""
        delay = self._next_delay
        self._next_delay = min(delay * 2, self._max_delay)
        self._first_attempt = False
        self._client.reconnect_delay_set(min_delay=delay, max_delay=delay)
        self.retry_wait_s = 2 * delay if waits_twice else delay  # a shared network loop waits exactly this
        return 2 * delay if waits_twice else delay

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._first_attempt = False
        if reason_code.is_failure:
            self._refused = str(reason_code)  # the on_disconnect that follows logs it, with the wait
            self._inbox.put(LinkDown(f"broker refused the connection: {reason_code}"))
            return
        self._next_delay = self._min_delay
        self._refused, self._was_connected = None, True
        logger.info("connected to %s", self.broker.url())
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        if subscriptions:  # one SUBSCRIBE: an agent amid a download may hold a filter per chunk it misses
            client.subscribe([(f, SubscribeOptions(qos=qos)) for f, qos in subscriptions])
        with self._lock:
            self._connection += 1
        self.connected.set()
        self._inbox.put(LinkUp(session_present=bool(flags.session_present)))

    def connect_failed(self) -> None:
        """A shared network loop's connection attempt failed (paho's own loop calls ``on_connect_fail``)."""
        self._on_connect_fail(self._client, None)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        error = connect_error_text(self._client.last_connect_error)
        # When the very first attempt (connect_async's) fails, paho's loop waits once in its connect
        # phase and once more in its reconnect phase before it tries again.
        delay = self._retry_in(waits_twice=self._first_attempt)
        logger.warning("cannot reach broker %s (%s), retrying in %d s", self.broker.url(), error, delay)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        self._inbox.put(LinkDown(str(reason_code)))
        if self._stopping:
            return
        if self._refused is not None:
            logger.warning("broker %s refused the connection (%s), retrying in %d s", self.broker.url(),
                           self._refused, self._retry_in())
        elif self._was_connected:
            logger.warning("lost the connection to %s (%s), reconnecting in %d s", self.broker.url(), reason_code,
                           self._retry_in())
        else:  # closed before it answered the connect
            logger.warning("cannot reach broker %s (%s), retrying in %d s", self.broker.url(), reason_code,
                           self._retry_in())
        self._refused, self._was_connected = None, False

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._inbox.put(
            Inbound(message.topic, bytes(message.payload), bool(message.retain), message.qos, message.mid,
                    self._connection)
        )

    # -- owner's thread ----------------------------------------------------

    def start(self) -> None:
        self._stopping, self._first_attempt, self._next_delay = False, True, self._min_delay
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        if self._max_packet_bytes is not None:
            props.MaximumPacketSize = self._max_packet_bytes
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        persistent = self._session_expiry_s > 0  # then every connect resumes the session, the first one too
        try:
            self._client.connect_async(
                self.broker.host, self.broker.port, keepalive=15, clean_start=not persistent, properties=props
            )
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot reach broker {self.broker.url()}: {exc}") from exc
        if self._network is not None:
            self._network.attach(self._client, self)
        else:
            self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        """Subscribe to each filter (in one SUBSCRIBE), now if connected and again on every connect."""
        with self._lock:
            for topic_filter in topic_filters:
                self._subscriptions[topic_filter] = qos
        if topic_filters and self.connected.is_set():
            self._client.subscribe([(f, SubscribeOptions(qos=qos)) for f in topic_filters])

    def unsubscribe(self, *topic_filters: str) -> None:
        """End the subscriptions among ``topic_filters`` that this link holds (in one UNSUBSCRIBE)."""
        with self._lock:
            known = [f for f in topic_filters if self._subscriptions.pop(f, None) is not None]
        if known and self.connected.is_set():
            self._client.unsubscribe(known)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        when_offline: str = "queue",
        expiry_s: int | None = None,
    ) -> int | None:
        """Hand a message to paho; returns its message id, or None when it was not sent.

        While disconnected, paho keeps QoS 1 messages and sends them on the next connection
        (``when_offline="queue"``); a message that is only worth sending now — a state that the
        next hello repeats, a chunk request the next connection renews — is skipped instead
        (``"drop"``, returns None). ``expiry_s`` lets the broker discard a message nobody read
        in time (MQTT 5 message expiry).
        """
        if when_offline == "drop" and not self.connected.is_set():
            return None
        properties = None
        if expiry_s is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.MessageExpiryInterval = expiry_s
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        except ValueError as exc:  # e.g. a payload over MQTT's size limit
            raise TransportError(f"publish to {topic} failed: {exc}") from exc
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            # NO_CONN still queues QoS>0 messages for the next connection.
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return info.mid

    def ack(self, message: Inbound) -> None:
        """Acknowledge a message handled for good (``manual_ack`` links only). A message from an
        earlier connection is not acknowledged: the broker delivers it again on this one."""
        if self._manual_ack and message.qos > 0 and message.connection == self._connection:
            self._client.ack(message.mid, message.qos)

    def ack_all(self, messages: Sequence[Inbound]) -> None:
        """``ack`` for many messages, the QoS 1 ones (every one a server subscribes to) in one write."""
        current = [m for m in messages if self._manual_ack and m.qos > 0 and m.connection == self._connection]
        self._client.ack_all([m.mid for m in current if m.qos == 1])
        for message in current:
            if message.qos == 2:
                self._client.ack(message.mid, message.qos)

    def stop(self, *, final: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly, optionally publishing one last retained message first."""
        self._stopping = True
        if final is not None and self.connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            try:
                if self._network is None:  # a shared loop sends it before the disconnect, in order
                    info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        if self._network is not None:
            self._network.detach(self._client)
        else:
            self._client.loop_stop()

    @property
    def stopping(self) -> bool:
        return self._stopping


def probe_broker(broker: BrokerAddress, *, client_id: str, timeout: float = 5.0) -> None:
    """Connect once (MQTT 5, clean start, no session kept) and disconnect; TransportError says why not.

    ``client_id`` must differ from the one the agent runs with: a second client under the same id
    would take over the running agent's connection.
    """
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.connect_timeout = timeout
    broker.configure(client)
    answers: list[Any] = []
    client.on_connect = lambda c, userdata, flags, reason_code, properties: answers.append(reason_code)
    try:
        client.connect(broker.host, broker.port, keepalive=max(5, int(timeout) + 1), clean_start=True)
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot reach broker {broker.url()} ({connect_error_text(exc)})") from exc
    deadline = time.monotonic() + timeout
    try:
        while not answers and time.monotonic() < deadline:
            rc = client.loop(timeout=0.1)
            if rc != paho.MQTT_ERR_SUCCESS and not answers:
                raise TransportError(f"cannot reach broker {broker.url()} ({paho.error_string(rc)})")
    finally:
        client.disconnect()
    if not answers:
        raise TransportError(f"cannot reach broker {broker.url()} (no answer to the connect within {timeout:g} s)")
    if answers[0].is_failure:
        raise TransportError(f"broker {broker.url()} refused the connection ({answers[0]})")
