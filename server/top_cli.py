"""``edgefleet top``: a live table of the fleet for an operator on SSH (``server/top.py`` draws it)."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

import click

from server.cli_options import DATA_DIR, duration_seconds, given_db_url


@click.command("top")
@DATA_DIR
@click.option("--interval", metavar="DURATION", callback=duration_seconds, default="2s", show_default=True,
              help="Time between redraws (e.g. 2, 2s, 1m).")
@click.option("--window", "window_s", metavar="DURATION", callback=duration_seconds, default="300s", show_default=True,
              help="Latency and calls/s over the serving reports of this last span (e.g. 300, 5m).")
@click.option("--once", is_flag=True, help="Print the table once and exit (for scripts).")
@click.option("--profile", default=None, help="Only the devices of this profile.")
def top_command(data_dir: Path, interval: float, window_s: float, once: bool, profile: str | None) -> None:
    """Devices with their model version, p50/p95 latency, calls/s and errors, redrawn until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from server.setup import open_workspace
    from server.top import fleet_rows, top_table

    db = open_workspace(data_dir, db_url=given_db_url()).db
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)

    def draw() -> Table:
        now = time.time()
        rows = fleet_rows(db, window_s=window_s, now=now, profile=profile)
        title = f"edgefleet top  {datetime.now().strftime('%H:%M:%S')}" + (f"  profile {profile}" if profile else "")
        return top_table(rows, window_s=window_s, now=now, title=title)

    if once:
        console.print(draw())
        return
    try:
        with Live(draw(), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(draw(), refresh=True)
    except KeyboardInterrupt:
        return
