"""500 simulated devices on the authenticated fleet broker complete a two-wave rollout of a real release.

Everything is a real process started through the CLI: ``edgefleet broker``
(TLS, a broker identity per device), the server (SQLite), and ``edgefleet
simulate`` with two worker processes running the real agent code for every
device, with a stand-in runtime for the trials. Devices are enrolled by
``edgefleet device register-fleet``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import Fleet, cli, expect_state, wait_for
from tests.fleet_broker import FleetBroker

pytestmark = pytest.mark.e2e

DEVICES = 500


def _summary(log: str) -> dict[str, Any]:
    """The ``--json`` summary ``edgefleet simulate`` prints last (its log lines come before it)."""
    start = log.rindex("\n{\n") + 1 if "\n{\n" in log else log.index("{\n")
    return json.loads(log[start:])  # type: ignore[no-any-return]


def _cli_under_load(*args: str) -> str:
    """``cli``, once more after a "database is locked": 500 devices reporting at once keep SQLite's write lock
    busy, and the CLI's connection setup can outwait its busy timeout (seen on 2 cores)."""
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True, timeout=300,
                              check=False)
        if proc.returncode == 0:
            return proc.stdout
        assert "database is locked" in proc.stderr, f"edgefleet {' '.join(args)} failed:\n{proc.stderr}"
    raise AssertionError(f"edgefleet {' '.join(args)}: the database stayed locked")


def test_500_simulated_devices_complete_a_two_wave_rollout(tmp_path: Path, digits_inputs: tuple[Path, Path]) -> None:
    started = time.monotonic()
    data_dir = tmp_path / "server"
    broker = FleetBroker(data_dir)
    cli("init", "--data-dir", str(data_dir), "--release-key", "online", "--broker-host", "127.0.0.1",
        "--broker-listen", broker.listen)
    fleet = Fleet(tmp_path, broker.start(), data_dir)
    try:
        cli("profile", "add", "sim", "--quantizations", "float32", "--recipe", "float32", "--data-dir", str(data_dir))
        configs = tmp_path / "configs"
        cli("device", "register-fleet", "--prefix", "sim", "--count", str(DEVICES), "--profile", "sim", "--out-dir",
            str(configs), "--data-dir", str(data_dir))
        fleet.start_server()
        fleet.start("simulate", "simulate", "--configs", str(configs), "--processes", "2", "--json")

        def all_online() -> bool:
            fleet.assert_alive()
            return sum(bool(row["online"]) for row in fleet.device_list().values()) == DEVICES

        wait_for(all_online, 120, f"{DEVICES} simulated devices to come online", every=1.0)
        model, evalset = digits_inputs
        ref = cli("model", "add", "digits", "--file", str(model), "--eval", str(evalset), "--data-dir",
                  str(data_dir)).split()[0]
        rollout_id = cli("rollout", "start", ref, "--profile", "sim", "--waves", "10%,100%", "--data-dir",
                         str(data_dir)).strip()

        def settled() -> dict[str, Any] | None:
            fleet.assert_alive()
            status = json.loads(_cli_under_load("rollout", "status", rollout_id, "--data-dir", str(data_dir), "--json"))
            return status if status["state"] != "running" else None

        status = expect_state(wait_for(settled, 240, f"rollout {rollout_id} to settle", every=1.0), "succeeded")

        assert [(w["target_count"], w["state"]) for w in status["waves"]] == [(50, "passed"), (DEVICES, "passed")]
        assert len(status["devices"]) == DEVICES
        assert all(d["state"] == "committed" for d in status["devices"]), [
            d for d in status["devices"] if d["state"] != "committed"][:5]
        listed = fleet.device_list()
        assert len(listed) == DEVICES
        assert {(row["active_model"], row["active_version"]) for row in listed.values()} == {("digits", 1)}

        fleet.stop_process("simulate")  # SIGTERM: every device disconnects cleanly, then the summary
        summary = _summary(fleet.log("simulate"))
        assert summary["devices"] == DEVICES and summary["processes"] == 2
        assert summary["outcomes"] == {"committed": DEVICES} and summary["active"] == {"digits v1": DEVICES}
        assert summary["connected"] == DEVICES and summary["connect_failures"] == 0
        wait_for(lambda: not any(row["online"] for row in fleet.device_list().values()), 60,
                 "every simulated device to be reported offline")
        print(f"\n{DEVICES} devices: {time.monotonic() - started:.1f} s in all; simulator threads "
              f"{summary['threads']}, {summary['rss_per_1000_devices_mib']} MiB per 1,000 devices")
    finally:
        fleet.stop()
        broker.stop()
