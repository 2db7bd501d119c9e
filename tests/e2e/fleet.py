"""A fleet of real processes for the end-to-end tests: a private Mosquitto, the server, agents.

Processes are started through the ``edgefleet`` CLI exactly as a user would;
each one logs to a file in the fleet's directory. Tests stop them politely,
kill them the hard way (SIGKILL), or arm a failpoint
(``shared.failpoints``) so the process kills itself at a precise step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.slots import SlotStore
from server.broker import Mosquitto

CLI_TIMEOUT_S = 300
ROLLOUT_TIMEOUT_S = 240
# Appended to an agent's TOML: a short benchmark and quick re-asks, so installs take seconds.
QUICK_AGENT_TOML = """\
[benchmark]
warmup_runs = 1
warmup_seconds = 0.0
min_runs = 20
min_seconds = 0.3

[trial]
timeout_seconds = 120.0

[download]
request_interval_seconds = 1.0
stall_timeout_seconds = 300.0
"""


def cli(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"edgefleet {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def wait_for(condition: Callable[[], Any], timeout: float, what: str, *, every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


def expect_state(status: dict[str, Any], state: str) -> dict[str, Any]:
    """``status`` (``rollout status --json``) if it is in ``state``; otherwise fail showing all of it, so a
    rollout that rolled back on a CI machine says which gate or device decided it."""
    assert status["state"] == state, f"rollout ended {status['state']}, not {state}:\n{json.dumps(status, indent=1)}"
    return status


@dataclass
class Fleet:
    root: Path
    broker: Mosquitto
    data_dir: Path
    devices: dict[str, str] = field(default_factory=dict)  # name -> id
    agent_dirs: dict[str, Path] = field(default_factory=dict)
    configs: dict[str, Path] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    dashboard: str = ""

    # -- processes ------------------------------------------------------------------

    def start(self, name: str, *args: str, failpoints: str | None = None, python: str | None = None) -> None:
        """``python``: another venv's (a device with other packages), which runs this checkout's code."""
        env = {**os.environ}
        env.pop("EDGEFLEET_FAILPOINTS", None)
        if failpoints:
            env["EDGEFLEET_FAILPOINTS"] = failpoints
        if python:
            env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.processes[name] = subprocess.Popen(
            [python or sys.executable, "-m", "edgefleet", "--log-level", "info", *args], stdout=log,
            stderr=subprocess.STDOUT, env=env,
        )
        log.close()

    def start_server(self) -> None:
        http = self.dashboard.removeprefix("http://") if self.dashboard else "off"
        self.start("server", "server", "--data-dir", str(self.data_dir), "--broker", self.broker.url, "--http", http)

    def start_agent(self, name: str, *, failpoints: str | None = None, python: str | None = None) -> None:
        self.start(name, "agent", "--config", str(self.configs[name]), failpoints=failpoints, python=python)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def assert_alive(self, *names: str) -> None:
        for name, proc in self.processes.items():
            if not names or name in names:
                assert proc.poll() is None, f"{name} died:\n{self.log(name)[-3000:]}"

    def stop_process(self, name: str) -> None:
        proc = self.processes.pop(name)
        proc.terminate()
        proc.wait(timeout=15)

    def kill(self, name: str) -> None:
        """SIGKILL: no clean-up, no last will sent politely, as in a power cut."""
        proc = self.processes.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=15)

    def wait_killed(self, name: str, timeout: float = 60) -> int:
        """Wait for a process that a failpoint will kill; returns its exit code (-9 for SIGKILL)."""
        proc = self.processes[name]
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} was not killed within {timeout:.0f} s:\n{self.log(name)[-3000:]}") from None
        del self.processes[name]
        return code

    def restart_broker(self) -> None:
        """The same broker again, same port and directory: what it saved (sessions, retained) is back."""
        self.broker = Mosquitto(self.broker.workdir, port=self.broker.port).start()

    def stop(self) -> None:
        for proc in self.processes.values():
            proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.processes.clear()

    # -- the operator's view ----------------------------------------------------------

    def register(self, name: str, profile: str, *, extra_toml: str = "", tags: tuple[str, ...] = (),
                 serve_report_interval_s: float | None = None) -> Path:
        """Register ``name``; its endpoint listens on any free port (its data dir's serve.json says which)."""
        config = self.root / f"{name}.toml"
        cli("device", "register", name, "--profile", profile, "--data-dir", str(self.data_dir),
            "--out", str(config), "--broker", self.broker.url, "--serve-listen", "127.0.0.1:0",
            *(f"--tag={tag}" for tag in tags))
        if serve_report_interval_s is not None:
            text = config.read_text(encoding="utf-8")
            assert "report_interval_s = 10.0" in text
            config.write_text(text.replace("report_interval_s = 10.0", f"report_interval_s = {serve_report_interval_s}"),
                              encoding="utf-8")
        if extra_toml:
            with open(config, "a", encoding="utf-8") as fh:
                fh.write("\n" + extra_toml)
        self.configs[name] = config
        self.agent_dirs[name] = self.root / f"{name}-data"
        return config

    def rollout_status(self, rollout_id: str) -> dict[str, Any]:
        return json.loads(cli("rollout", "status", rollout_id, "--data-dir", str(self.data_dir), "--json"))

    def wait_settled(self, rollout_id: str, timeout: float = ROLLOUT_TIMEOUT_S) -> dict[str, Any]:
        """The rollout's status once it stopped running; every process must stay alive meanwhile."""
        def settled() -> dict[str, Any] | None:
            self.assert_alive()
            status = self.rollout_status(rollout_id)
            return status if status["state"] != "running" else None

        return wait_for(settled, timeout, f"rollout {rollout_id} to settle", every=0.5)

    def device_list(self) -> dict[str, dict[str, object]]:
        return {row["name"]: row for row in json.loads(cli("device", "list", "--data-dir", str(self.data_dir), "--json"))}

    def wait_online(self, *names: str, timeout: float = 60) -> None:
        def online() -> bool:
            self.assert_alive()
            listed = self.device_list()
            return all(listed[n]["online"] for n in names)

        wait_for(online, timeout, f"{', '.join(names)} to come online", every=0.5)

    def active_digest(self, name: str) -> str | None:
        return SlotStore(self.agent_dirs[name]).digest_of_active()
