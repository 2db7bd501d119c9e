"""``WebServer``: the HTTP app under uvicorn on a thread of its own, for ``edgefleet server --http`` and the demo.

Port 0 binds any free port; ``url`` then says which. uvicorn logs through our logging (its own
handlers are not installed); its access log, a line per request, is on only at debug level (it shows
paths, never a token: tokens travel in a header, a cookie or a form body, never in a URL).

``auth``: None decides by the address (a token is needed beyond loopback, ``server.web.auth``), True
forces it on, False is refused beyond loopback. ``tls`` (certificate and key PEM files) serves HTTPS
through uvicorn's ssl options, TLS 1.2 at least; a file that cannot be loaded fails here, in the caller.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from server.db import Database
from server.enrolment import Enrolment
from server.web.app import create_app
from server.web.auth import auth_required
from shared.errors import ConfigError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


class WebServer:
    def __init__(self, db: Database, host: str, port: int, *, auth: bool | None = None,
                 tls: TlsFiles | None = None, enrolment: Enrolment | None = None) -> None:
        """``enrolment``: serve ``/enrol`` (``server/web/enrol.py``)."""
        self.db = db
        self.auth_required = auth_required(host, auth)  # UserInputError: --no-auth beyond loopback
        self.tls = tls
        config = uvicorn.Config(
            create_app(db, auth_required=self.auth_required, enrolment=enrolment), log_config=None, lifespan="off",
            timeout_graceful_shutdown=2, access_log=logger.isEnabledFor(logging.DEBUG),  # a line per request: debug
            ssl_certfile=tls.cert if tls else None, ssl_keyfile=tls.key if tls else None,
        )
        if tls is not None:
            try:
                config.load()  # the certificate and key now, so a bad one fails in the caller
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot serve HTTPS with --http-cert {tls.cert} and --http-key {tls.key}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from exc
            assert config.ssl is not None
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        # bound here, so a busy port fails in the caller (OSError) and port 0 has its number at once
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.host, self.port = host, self._socket.getsockname()[1]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="web", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def start(self) -> WebServer:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(START_TIMEOUT_S / 0.01)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not self._server.started:
            raise OSError(f"the web server did not start on {self.url}")
        logger.info("dashboard and API at %s (%s)", self.url,
                    "a token is needed" if self.auth_required else "open on loopback; writes need an operator token")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)
        self._socket.close()
