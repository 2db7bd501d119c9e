"""One thread drives the MQTT connections of many simulated devices.

A real agent gives its paho client a thread of its own (``loop_start``); ten
thousand devices in one process cannot. ``SharedNetwork`` is paho's external
event loop for all of them: one selector over every client's socket,
``loop_read``/``loop_write`` when a socket is ready, ``loop_misc`` for
keepalives, and connection attempts on a timer. Each link keeps its own
protocol behaviour: its callbacks still only hand off to its service's inbox,
and it still decides (and logs) how long to wait before the next attempt
(``MqttLink.retry_wait_s``); this loop only keeps to it.

paho calls the socket callbacks on whichever thread touched the client: a
publish from a service's loop asks for write interest from that thread, so
every change of the selector happens under one lock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from shared.mqtt import MqttLink

logger = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0  # keepalive checks; the links' keepalive is 15 s
DISCONNECT_GRACE_S = 3.0  # a stopping link's last messages and DISCONNECT get this long to go out
CONNECTS_PER_PASS = 50  # connection attempts (TLS handshakes block) between two looks at the sockets
acting_for = threading.local()  # .name: the device a simulator thread works for now, for its log lines


class DeviceName(logging.Filter):
    """Prefix each log line with the device a simulator thread was working for when it was logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(acting_for, "name", None)
        if name and not getattr(record, "device_prefixed", False):
            record.msg, record.device_prefixed = f"[{name}] {record.msg}", True
        return True


class SharedNetwork:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # the selector, the request list and the closed set
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._requests: list[tuple[str, paho.Client, MqttLink | None]] = []
        self._closed: set[paho.Client] = set()
        # Touched by the loop thread only:
        self._links: dict[paho.Client, MqttLink] = {}
        self._due: list[tuple[float, int, paho.Client]] = []  # connection attempts (heap by time)
        self._scheduled: set[paho.Client] = set()
        self._closing: dict[paho.Client, float] = {}  # detached, until their socket closes or this deadline
        self._order = itertools.count()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.connect_attempts = 0
        self.connect_failures = 0

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="simulate-network", daemon=True)
        self._thread.start()

    def attach(self, client: paho.Client, link: MqttLink) -> None:
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        self._request("attach", client, link)

    def detach(self, client: paho.Client) -> None:
        self._request("detach", client, None)

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop once every link has detached (or after ``timeout``)."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def attached(self) -> int:
        return len(self._links)

    def _request(self, what: str, client: paho.Client, link: MqttLink | None) -> None:
        with self._lock:
            self._requests.append((what, client, link))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (the buffer is full), or closed

    # -- paho's socket callbacks (any thread) -------------------------------------------------

    def _socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with self._lock:
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with self._lock:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            self._closed.add(client)
        self._wake()

    def _register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._interest(sock, client, selectors.EVENT_READ | selectors.EVENT_WRITE)
        self._wake()

    def _unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._interest(sock, client, selectors.EVENT_READ)

    def _interest(self, sock: Any, client: paho.Client, events: int) -> None:
        with self._lock:
            try:
                if self._selector.get_key(sock).events != events:
                    self._selector.modify(sock, events, client)
            except (KeyError, ValueError, OSError):
                pass  # closed meanwhile: the close callback has it

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL_S
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stopping.is_set():
                stop_deadline = stop_deadline or now + DISCONNECT_GRACE_S
                if not self._links or now > stop_deadline:
                    return
            timeout = min(next_misc, self._due[0][0] if self._due else next_misc) - now
            try:
                events = self._selector.select(max(0.0, min(timeout, 0.5)))
            except (OSError, ValueError):  # the selector closed under us: stop() gave up waiting
                return
            for key, mask in events:
                if key.data is None:
                    self._drain_wake()
                    continue
                self._serve(key.data, key.fileobj, mask)
            self._handle_requests()
            now = time.monotonic()
            self._connect_due(now)
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL_S
                self._misc(now)
            self._handle_closed(time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _serve(self, client: paho.Client, sock: Any, mask: int) -> None:
        if client.socket() is not sock:
            return  # a socket closed since select() returned
        acting_for.name = _name(client)
        try:
            if mask & selectors.EVENT_READ:
                rc = client.loop_read()
                # TLS may hold whole records the socket no longer shows as readable
                while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and _pending(client.socket()):
                    rc = client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        except Exception:  # a bug in one connection must not stop the others
            logger.exception("unexpected error on the connection of %s: reconnecting", _name(client))
            self._schedule(client, time.monotonic() + 1.0)  # reconnect() closes the broken socket first

    def _handle_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for what, client, link in requests:
            if what == "attach" and link is not None:
                self._links[client] = link
                self._schedule(client, time.monotonic())
            elif what == "detach" and client in self._links:
                if client.socket() is None:
                    self._forget(client)
                else:  # its last messages and DISCONNECT are on their way; the close callback ends it
                    self._closing[client] = time.monotonic() + DISCONNECT_GRACE_S

    def _schedule(self, client: paho.Client, at: float) -> None:
        if client not in self._scheduled:
            self._scheduled.add(client)
            heapq.heappush(self._due, (at, next(self._order), client))

    def _connect_due(self, now: float) -> None:
        for _ in range(CONNECTS_PER_PASS):
            if not self._due or self._due[0][0] > now:
                return
            _, _, client = heapq.heappop(self._due)
            acting_for.name = _name(client)
            self._scheduled.discard(client)
            link = self._links.get(client)
            if link is None or link.stopping:
                continue
            self.connect_attempts += 1
            try:
                client.reconnect()
            except (OSError, ValueError):
                self.connect_failures += 1
                link.connect_failed()  # logs why, and sets the wait
                self._schedule(client, time.monotonic() + link.retry_wait_s)

    def _misc(self, now: float) -> None:
        for client in list(self._links):
            sock = client.socket()
            if sock is None:
                continue
            try:
                client.loop_misc()
                if client.want_write():  # a write interest lost in a race between threads
                    self._interest(sock, client, selectors.EVENT_READ | selectors.EVENT_WRITE)
            except Exception:
                logger.exception("unexpected error keeping the connection of %s alive: reconnecting", _name(client))
                self._schedule(client, now + 1.0)
        for client, deadline in list(self._closing.items()):
            if now > deadline:
                self._abandon(client)

    def _handle_closed(self, now: float) -> None:
        with self._lock:
            closed, self._closed = self._closed, set()
        for client in closed:
            link = self._links.get(client)
            if link is None:
                continue
            if link.stopping or client in self._closing:
                self._forget(client)
            elif client.socket() is None:  # lost: try again after the wait the link announced
                self._schedule(client, now + link.retry_wait_s)

    def _abandon(self, client: paho.Client) -> None:
        """A stopping link whose DISCONNECT did not go out in time: close its socket and let it go."""
        sock = client.socket()
        if sock is not None:
            self._socket_close(client, None, sock)
            try:
                sock.close()
            except OSError:
                pass
        self._forget(client)

    def _forget(self, client: paho.Client) -> None:
        self._links.pop(client, None)
        self._closing.pop(client, None)
        self._scheduled.discard(client)


def _pending(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    return bool(pending is not None and pending() > 0)


def _name(client: paho.Client) -> str:
    return client._client_id.decode(errors="replace").removeprefix("ef-agent-")
