"""``edgefleet top``: the fleet's devices with their served model and latency, as a rich table.

``fleet_rows`` reads the devices (``server.devices.list_devices``) and the
latency read model (``server.latency.latency_summary``: the reports whose
interval ended in the last ``window_s`` seconds, merged per device) and
joins them; ``top_table`` turns rows into a ``rich.table.Table`` and reads
nothing. The command (``server/top_cli.py``) redraws it every few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

from server.db import Database
from server.devices import DeviceRow, list_devices
from server.latency import DeviceLatencySummary, latency_summary
from server.selection import Selection


@dataclass(frozen=True)
class TopRow:
    device: str
    profile: str
    online: bool
    model: str | None
    version: int | None
    p50_ms: float | None
    p95_ms: float | None
    calls_per_s: float
    errors: int
    last_report: float | None  # epoch seconds of the newest serving report, ever


def fleet_rows(db: Database, *, window_s: float, now: float, profile: str | None = None) -> list[TopRow]:
    """Every live device (of ``profile``, which must exist), sorted by profile then name."""
    devices = list_devices(db, Selection(profiles=(profile,)) if profile else None)
    return join_rows(devices, latency_summary(db, window_s=window_s, now=now))


def join_rows(devices: list[DeviceRow], summary: dict[str, DeviceLatencySummary]) -> list[TopRow]:
    rows = []
    for device in devices:
        latency = summary.get(device.id)
        model, version = device.active_model, device.active_version
        if model is None and latency is not None:  # not reported in its state yet, but it serves
            model, version = latency.model, latency.version
        rows.append(TopRow(
            device=device.name, profile=device.profile, online=device.online, model=model, version=version,
            p50_ms=latency.stats.p50_ms if latency else None, p95_ms=latency.stats.p95_ms if latency else None,
            calls_per_s=latency.calls_per_s if latency else 0.0, errors=latency.stats.errors if latency else 0,
            last_report=latency.last_report if latency else None,
        ))
    return sorted(rows, key=lambda r: (r.profile, r.device))


def age(seconds: float | None) -> str:
    """A short age: 5s, 3m, 2h, 4d; '-' for never."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def top_table(rows: list[TopRow], *, window_s: float, now: float, title: str = "") -> Table:
    """The devices as a table; latency columns are over the last ``window_s`` seconds."""
    online = sum(r.online for r in rows)
    table = Table(
        title=title or None,
        caption=f"{len(rows)} devices, {online} online; latency and calls over the last {window_s:g} s",
        caption_justify="left", header_style="bold",
    )
    table.add_column("DEVICE", no_wrap=True)
    table.add_column("PROFILE", no_wrap=True)
    table.add_column("ONLINE", no_wrap=True)
    table.add_column("MODEL", no_wrap=True)
    for name in ("P50 MS", "P95 MS", "CALLS/S", "ERRORS", "LAST REPORT"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.device, r.profile,
            Text("yes", style="green") if r.online else Text("no", style="red"),
            f"{r.model}:{r.version}" if r.model is not None else "-",
            _ms(r.p50_ms), _ms(r.p95_ms), f"{r.calls_per_s:.2f}" if r.calls_per_s else "0",
            Text(str(r.errors), style="red") if r.errors else "0",
            age(now - r.last_report) if r.last_report is not None else "-",
        )
    return table
