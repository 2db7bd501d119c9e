"""Latency retention survives a server killed mid-compaction (a real ``edgefleet server`` process, SIGKILL).

Compaction merges raw serving reports into per-minute rollups and deletes them in one transaction. A
server killed before that commit leaves every raw report as it was; one killed right after it leaves
them all in rollups; the server that comes back carries on, and no call is lost or counted twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from server.db import Database
from server.db.models import ServingReportRecord, ServingRollup, ServingTotal
from server.devices import register_device
from server.latency import device_latency
from server.setup import Workspace
from tests.server.latency_helpers import ingest, serving

DAY_S = 86_400.0
REPORTS = 40


def counts(db: Database) -> tuple[int, int, int, int]:
    """(raw reports, calls in raw reports, calls in rollups, calls in totals)."""
    with db.reading() as session:
        raw = session.scalar(select(func.count()).select_from(ServingReportRecord)) or 0
        raw_calls = session.scalar(select(func.coalesce(func.sum(ServingReportRecord.calls), 0))) or 0
        rolled = session.scalar(select(func.coalesce(func.sum(ServingRollup.calls), 0))) or 0
        totals = session.scalar(select(func.coalesce(func.sum(ServingTotal.calls), 0))) or 0
    return int(raw), int(raw_calls), int(rolled), int(totals)


def run_server(data_dir: Path, broker_url: str, failpoint: str | None, *, until_s: float = 60.0) -> int | None:
    """Start ``edgefleet server``; with a failpoint, wait for it to kill itself and return its exit code.
    Without one, let it compact for a moment, stop it politely and return None."""
    env = {**os.environ}
    env.pop("EDGEFLEET_FAILPOINTS", None)
    if failpoint:
        env["EDGEFLEET_FAILPOINTS"] = failpoint
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "server", "--data-dir", str(data_dir), "--broker", broker_url,
         "--http", "off"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if failpoint:
            return proc.wait(timeout=until_s)
        time.sleep(5)  # compaction runs as the loop starts
        proc.terminate()
        proc.wait(timeout=30)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_server_killed_mid_compaction_loses_and_doubles_nothing(workspace: Workspace, mosquitto: object) -> None:
    broker_url = mosquitto.url  # type: ignore[attr-defined]
    device = register_device(workspace.db, "cam-1", "x86-64")
    old = time.time() - 2 * DAY_S  # past the default 24 h raw retention
    ingest(workspace.db, *(serving(device.id, seq, [0.5 + seq / 100] * (seq + 1), end=old + seq * 10)
                           for seq in range(REPORTS)))
    calls = sum(seq + 1 for seq in range(REPORTS))
    assert counts(workspace.db) == (REPORTS, calls, 0, calls)

    def whole_range_calls() -> int:
        series = device_latency(workspace.db, "cam-1", since=old - DAY_S, until=time.time(), step_s=DAY_S)
        return sum(point.stats.calls for point in series.points)

    data_dir = workspace.data_dir.root
    # killed after merging and deleting, before the commit: nothing moved
    assert run_server(data_dir, broker_url, "server.latency.rolled_up=kill") == -9
    assert counts(workspace.db) == (REPORTS, calls, 0, calls)
    # killed right after the commit: every raw report is in a rollup, none also left raw
    assert run_server(data_dir, broker_url, "server.latency.compacted=kill") == -9
    assert counts(workspace.db) == (0, 0, calls, calls)
    assert whole_range_calls() == calls
    # the server that comes back carries on: nothing left to roll up, nothing merged twice
    assert run_server(data_dir, broker_url, None) is None
    assert counts(workspace.db) == (0, 0, calls, calls)
    assert whole_range_calls() == calls
