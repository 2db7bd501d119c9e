"""The local inference endpoint on the standard library's HTTP server (the agent stays light).

``InferenceApp`` answers the three routes from the model host and records
every call; ``start_endpoint`` binds a ``ThreadingHTTPServer`` on TCP or a
``ThreadingUnixStreamServer`` on a unix socket, with the same handler, and
serves on threads of its own.

Errors are JSON ``{"error": CODE, "detail": "..."}``: 400 bad JSON, wrong
shape (saying the expected one), 413 a body over ``MAX_BODY_BYTES``, 415 an
unknown Content-Type, 503 no model to serve (saying why), 404 unknown path,
405 wrong method, 500 an inference that failed.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.serving.bodies import JSON, BadRequest, json_bytes, parse_batch
from agent.serving.host import ModelHost
from agent.serving.recorder import LatencyRecorder
from shared.errors import EdgefleetError, ModelUnavailableError
from shared.inference_client import NPY, npy_bytes
from shared.serve_address import ServeAddress

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(status: int, code: str, detail: str) -> Reply:
    return Reply(status, json_bytes({"error": code, "detail": detail}))


class InferenceApp:
    """The routes, free of HTTP plumbing: each returns a Reply."""

    def __init__(self, host: ModelHost, recorder: LatencyRecorder) -> None:
        self.host = host
        self.recorder = recorder

    def infer(self, body: bytes, content_type: str, accept: str) -> Reply:
        started = time.perf_counter()
        served = self.host.current
        if served is None:
            return error_reply(503, "no_model", self.host.unavailable_reason())
        try:
            batch = parse_batch(body, content_type, served.sample_shape)
            served, outputs, invoke_ms = self.host.run(batch)
        except BadRequest as exc:
            self._error(served)
            status = 415 if exc.code == "unsupported_media_type" else 400
            return error_reply(status, exc.code, str(exc))
        except ModelUnavailableError as exc:
            return error_reply(503, "no_model", str(exc))
        except EdgefleetError as exc:
            self._error(served)
            return error_reply(500, "inference_failed", str(exc))
        source = served.source
        if NPY in accept:
            reply = Reply(200, npy_bytes(outputs), NPY, (
                ("X-Edgefleet-Model", source.model), ("X-Edgefleet-Version", str(source.version)),
                ("X-Edgefleet-Quantization", source.quantization)))
        else:
            reply = Reply(200, json_bytes({"outputs": outputs.tolist(), "model": source.model,
                                           "version": source.version, "quantization": source.quantization}))
        description = served.model.description
        self.recorder.record(source, description.runtime.name, description.threads, invoke_ms=invoke_ms,
                             e2e_ms=(time.perf_counter() - started) * 1000.0, samples=len(batch))
        return reply

    def _error(self, served: Any) -> None:
        description = served.model.description
        self.recorder.error(served.source, description.runtime.name, description.threads)

    def model(self) -> Reply:
        served = self.host.current
        if served is None:
            return error_reply(503, "no_model", self.host.unavailable_reason())
        document = served.describe()
        document["load_error"] = self.host.load_error()
        return Reply(200, json_bytes(document))

    def healthz(self) -> Reply:
        served = self.host.current
        if served is None:
            return Reply(503, json_bytes({"ok": False, "detail": self.host.unavailable_reason()}))
        return Reply(200, json_bytes({"ok": True, "model": served.source.model, "version": served.source.version}))


class InferenceHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's calls reuse one connection
    server_version = "edgefleet-agent"
    # Buffered writes, flushed once per request: headers and body leave in one segment. Two small writes
    # would meet Nagle's algorithm and the client's delayed ACK: ~40 ms per call on TCP.
    wbufsize = 64 * 1024

    @property
    def app(self) -> InferenceApp:
        app = getattr(self.server, "app", None)
        assert isinstance(app, InferenceApp), "start_endpoint sets the server's app"
        return app

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        routes = {"/v1/infer": "POST", "/v1/model": "GET", "/healthz": "GET"}
        if path not in routes:
            self._discard_body()
            self._send(error_reply(404, "not_found", f"no route {path}; try POST /v1/infer, GET /v1/model, "
                                   "GET /healthz"))
            return
        if method != routes[path]:
            self._discard_body()
            self._send(error_reply(405, "method_not_allowed", f"{path} takes {routes[path]}"))
            return
        try:
            if path == "/v1/infer":
                body = self._body()
                reply = self.app.infer(body, self.headers.get("Content-Type", JSON),
                                       self.headers.get("Accept", "")) if isinstance(body, bytes) else body
            elif path == "/v1/model":
                reply = self.app.model()
            else:
                reply = self.app.healthz()
        except Exception:  # a bug: answer 500, keep serving
            logger.exception("unexpected error answering %s %s", method, path)
            reply = error_reply(500, "internal_error", "unexpected error; see the agent's log")
        self._send(reply)

    def _length(self) -> int | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _body(self) -> bytes | Reply:
        length = self._length()
        if length is None:
            self.close_connection = True
            return error_reply(400, "bad_request", "a request body needs a valid Content-Length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread
            return error_reply(413, "too_large", f"the body has {length} bytes; the limit is {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def _discard_body(self) -> None:
        length = self._length()
        if length is None or length > MAX_BODY_BYTES:
            self.close_connection = True
        elif length:
            self.rfile.read(length)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def address_string(self) -> str:
        address = self.client_address
        return str(address[0]) if isinstance(address, tuple) and address else "unix"


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: InferenceApp | None = None


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    app: InferenceApp | None = None


class Endpoint:
    """A bound, serving endpoint: ``url`` (``http://HOST:PORT`` or ``unix:/path``) and ``stop()``."""

    def __init__(self, server: socketserver.BaseServer, url: str, unix_path: str = "") -> None:
        self.server = server
        self.url = url
        self.unix_path = unix_path
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="inference-endpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass


def start_endpoint(address: ServeAddress, app: InferenceApp) -> Endpoint:
    """Bind ``address`` and serve ``app`` on threads of its own; OSError when the address is taken."""
    if address.unix_path:
        path = address.unix_path
        if os.path.exists(path) and not _answers(path):
            os.unlink(path)  # a stale socket a previous run left behind
        unix = _UnixServer(path, InferenceHandler)
        unix.app = app
        return Endpoint(unix, f"unix:{path}", path)
    server_cls = _TCP6Server if ":" in address.host else _TCPServer
    tcp = server_cls((address.host, address.port), InferenceHandler)
    tcp.app = app
    host, port = str(tcp.server_address[0]), int(tcp.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    return Endpoint(tcp, f"http://{shown}:{port}")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
