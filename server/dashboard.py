"""A read-only HTTP view of the fleet: JSON API and a self-refreshing dashboard page.

Served by ``edgefleet server --http HOST:PORT`` on a thread of its own; every
request reads the registry in one short session.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from server.db import Database, queries
from server.devices import list_devices
from server.rollouts import rollout_status
from server.rollouts.read_model import status_json
from shared.errors import EdgefleetError, NotFoundError

logger = logging.getLogger(__name__)


def fleet_snapshot(db: Database) -> dict[str, Any]:
    """Devices with their latest on-device trials, and recent rollouts."""
    devices = [asdict(d) for d in list_devices(db)]
    with db.reading() as session:
        for device in devices:
            device["trials"] = [
                {
                    "deployment": t.deployment_id,
                    "ts": t.ts,
                    "p50_ms": t.p50_ms,
                    "p95_ms": t.p95_ms,
                    "accuracy": t.accuracy,
                    "runtime": (t.body.get("benchmark") or {}).get("runtime"),
                }
                for t in queries.recent_trials(session, device["id"], limit=10)
            ]
        rollout_ids = [r.id for r in queries.recent_rollouts(session)]
    rollouts = []
    for rollout_id in rollout_ids:
        status = rollout_status(db, rollout_id)
        rollouts.append(status_json(status))
    return {"devices": devices, "rollouts": rollouts}


def _fmt(value: Any, spec: str = "") -> str:
    return "–" if value is None else html.escape(format(value, spec) if spec else str(value))


def render_page(snapshot: dict[str, Any]) -> str:
    device_rows = "".join(
        "<tr><td>{}</td><td>{}</td><td class='{}'>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            _fmt(d["name"]), _fmt(d["profile"]), "on" if d["online"] else "off",
            "online" if d["online"] else "offline",
            _fmt(f"{d['active_model']} v{d['active_version']}" if d["active_model"] else None),
            _fmt(d["active_recipe"] or d["active_quantization"]),  # the recipe that built it, when known
            _fmt(d["trials"][0]["p50_ms"] if d["trials"] else None, ".4f"),
            _fmt(d["trials"][0]["p95_ms"] if d["trials"] else None, ".4f"),
            _fmt(d["runtime"]),
        )
        for d in snapshot["devices"]
    )
    rollout_blocks = "".join(
        "<h3>{} &middot; {}:{} &middot; {}</h3><table><tr><th>device</th><th>profile</th><th>state</th>"
        "<th>variant</th><th>bytes</th><th>p50 ms</th><th>p95 ms</th><th>accuracy</th><th>reason</th></tr>{}</table>".format(
            _fmt(r["rollout"]), _fmt(r["model"]), _fmt(r["version"]), _fmt(r["state"]),
            "".join(
                f"<tr><td>{_fmt(d['device'])}</td><td>{_fmt(d['profile'])}</td><td>{_fmt(d['state'])}</td>"
                f"<td>{_fmt(d['quantization'])}</td><td>{_fmt(d['size_bytes'])}</td><td>{_fmt(d['p50_ms'], '.4f')}</td>"
                f"<td>{_fmt(d['p95_ms'], '.4f')}</td><td>{_fmt(d['accuracy'], '.4f')}</td><td>{_fmt(d['reason'])}</td></tr>"
                for d in r["devices"]
            ),
        )
        for r in snapshot["rollouts"]
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<title>edgefleet</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}} th{{background:#f4f4f4}}
.on{{color:#0a0}} .off{{color:#a00}}</style></head><body>
<h1>edgefleet</h1><h2>Devices &mdash; latest on-device latency</h2>
<table><tr><th>device</th><th>profile</th><th>status</th><th>active model</th><th>variant</th>
<th>p50 ms</th><th>p95 ms</th><th>runtime</th></tr>{device_rows}</table>
<h2>Rollouts</h2>{rollout_blocks or "<p>none yet</p>"}
<p><a href="/api/fleet">/api/fleet</a> (JSON)</p></body></html>"""


class DashboardServer:
    def __init__(self, db: Database, host: str, port: int) -> None:
        self.db = db
        handler = self._handler_class()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        db = self.db

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("http: " + format, *args)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, value: Any) -> None:
                self._send(status, json.dumps(value, indent=2).encode(), "application/json")

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                try:
                    if path == "/":
                        self._send(HTTPStatus.OK, render_page(fleet_snapshot(db)).encode(), "text/html; charset=utf-8")
                    elif path == "/api/fleet":
                        self._json(HTTPStatus.OK, fleet_snapshot(db))
                    elif path.startswith("/api/rollouts/"):
                        status = rollout_status(db, path.removeprefix("/api/rollouts/"))
                        self._json(HTTPStatus.OK, status_json(status))
                    elif path == "/healthz":
                        self._json(HTTPStatus.OK, {"ok": True})
                    else:
                        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}"})
                except NotFoundError as exc:
                    self._json(HTTPStatus.NOT_FOUND, {"error": str(exc)})
                except EdgefleetError as exc:
                    logger.error("dashboard request %s failed: %s", path, exc)
                    self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})

        return Handler

    def start(self) -> DashboardServer:
        self._thread.start()
        logger.info("dashboard at %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
