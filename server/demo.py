"""``edgefleet demo``: a whole local fleet, end to end, on this machine.

A private Mosquitto on a free port, the server on a fresh SQLite data dir,
three agent processes with different profiles, a digits CNN trained here,
one compressed rollout, and the on-device latency table.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import click

from server.broker import Mosquitto, free_port
from server.catalog import add_model
from server.cli import report_table
from server.compression import compression_report
from server.devices import agent_config_toml, register_device
from server.rollout_cli import status_table
from server.rollouts import RolloutStatus, rollout_status, start_rollout
from server.selection import Selection
from server.setup import init_data_dir
from shared.errors import UserInputError

MARKER = ".edgefleet-demo"
FLEET = (("pi4-kitchen", "rpi4"), ("nano-dock", "jetson-nano"), ("nuc-lab", "x86-64"))


@dataclass
class Processes:
    running: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: list[str], log: Path) -> None:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "--log-level", "info", *args], stdout=out, stderr=subprocess.STDOUT
            )
        self.running.append((name, proc))

    def check(self) -> None:
        for name, proc in self.running:
            if proc.poll() is not None:
                raise click.ClickException(f"{name} exited with code {proc.returncode}; see its log")

    def stop(self) -> None:
        for _, proc in reversed(self.running):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _fresh_workdir(workdir: Path) -> Path:
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise UserInputError(f"{workdir} exists and is not a demo directory; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by 'edgefleet demo'; deleted by the next demo run\n")
    return workdir.resolve()


def _wait_settled(data_dir_db: object, rollout_id: str, processes: Processes, timeout: float) -> RolloutStatus:
    from server.db import Database

    assert isinstance(data_dir_db, Database)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = rollout_status(data_dir_db, rollout_id)
        summary = ", ".join(f"{d.device} {d.state}" for d in status.devices)
        if summary != last:
            click.echo(f"  {summary}")
            last = summary
        if status.settled or time.monotonic() > deadline:
            return status
        processes.check()
        time.sleep(0.5)


def _edgefleet_command() -> str:
    """How to run edgefleet from the operator's shell: from a virtualenv (scripts/demo runs in .venv without
    activating it for the caller), the command by its absolute path, which works whether or not it is on PATH."""
    launcher = Path(sys.executable).parent / "edgefleet"
    if sys.prefix == sys.base_prefix or not launcher.exists():
        return "edgefleet"
    return str(launcher.absolute())


def _serving(url: str) -> bool:
    """True when the dashboard answers its health check now."""
    try:
        with urllib.request.urlopen(url + "healthz", timeout=5) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        return False


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("edgefleet-demo"),
              show_default=True, help="Where the demo keeps its broker, server and agent files (recreated).")
@click.option("--once", is_flag=True,
              help="Stop everything (the dashboard too) and exit after printing the table.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the rollout.")
def demo_command(workdir: Path, once: bool, timeout: float) -> None:
    """Run a local demo fleet: broker, server, three agents, a real compressed rollout."""
    from server.compress.digits import write_demo_inputs

    workdir = _fresh_workdir(workdir)
    logs = workdir / "logs"
    logs.mkdir()
    broker = Mosquitto(workdir / "broker")
    processes = Processes()
    try:
        broker.start()
        click.echo(f"broker     {broker.url} (private Mosquitto)")
        workspace = init_data_dir(workdir / "server")
        keys = workspace.keys()
        dashboard = f"127.0.0.1:{free_port()}"
        dashboard_url = f"http://{dashboard}/"
        processes.start(
            "server",
            ["server", "--data-dir", str(workspace.data_dir.root), "--broker", broker.url, "--http", dashboard],
            logs / "server.log",
        )
        click.echo(f"server     data dir {workspace.data_dir.root}")
        for name, profile in FLEET:
            device = register_device(workspace.db, name, profile)
            config = workdir / "agents" / f"{name}.toml"
            config.parent.mkdir(exist_ok=True)
            config.write_text(agent_config_toml(device, broker.url, keys, workdir / "agents" / name))
            processes.start(name, ["agent", "--config", str(config)], logs / f"{name}.log")
            click.echo(f"agent      {name} ({profile})")
        click.echo("training   a digits CNN on scikit-learn's bundled digits data ...")
        model_path, eval_path = write_demo_inputs(workdir / "inputs")
        version = add_model(workspace.db, workspace.blobs, "digits", model_path, eval_path)
        click.echo(f"model      digits:{version.version}, float reference accuracy {version.reference_accuracy:.4f}")
        click.echo("rollout    compressing per profile and signing ...")
        rollout_id = start_rollout(workspace.db, workspace.blobs, keys, "digits",
                                   Selection(profiles=tuple(sorted({p for _, p in FLEET}))))
        click.echo(f"rollout    {rollout_id} started; waiting for the devices:")
        status = _wait_settled(workspace.db, rollout_id, processes, timeout)
        click.echo("")
        reports = compression_report(workspace.db, "digits:1")
        click.echo("what auto measured on this host, per profile (edgefleet model report digits:1):\n")
        click.echo("\n\n".join(report_table(r) for r in reports))
        click.echo("")
        click.echo(status_table(status))
        click.echo("")
        click.echo(f"logs       {logs}")
        click.echo(f"status     {_edgefleet_command()} rollout status {rollout_id} --data-dir {workspace.data_dir.root}")
        if not status.settled:
            raise click.ClickException(f"the rollout did not settle within {timeout:.0f} s; see {logs}")
        if once:  # everything stops as this returns: the dashboard too, so no address to visit
            click.echo(f"dashboard  was served at {dashboard_url} during the run; run without --once to keep it up")
            return
        if _serving(dashboard_url):
            click.echo(f"dashboard  {dashboard_url} (until Ctrl-C)")
        else:
            click.echo(f"dashboard  not answering at {dashboard_url}; see {logs / 'server.log'}")
        click.echo("the fleet keeps running; press Ctrl-C to stop it")
        stop = {"now": False}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["now"]:
            processes.check()
            time.sleep(0.5)
    finally:
        processes.stop()
        broker.stop()
