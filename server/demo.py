"""``edgefleet demo``: a whole local fleet, end to end, on this machine.

The fleet's own Mosquitto as `edgefleet broker` runs it (TLS, an identity and topic ACLs per
device) on a free port, the server on a fresh SQLite data dir,
three agent processes with different profiles, a digits CNN trained here,
one compressed rollout, then traffic: a load generator (``server/load_generator.py``)
calls each agent's local inference endpoint with the digits eval samples, the
agents report their latency every 2 s, and the demo prints the on-device
latency table from those calls and the dashboard's address.
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

from server.broker import free_port, wait_listening
from server.broker_identities import new_identity, sync_broker, write_device_files
from server.broker_setup import BrokerLayout, setup_broker
from server.catalog import add_model
from server.compression import compression_report
from server.devices import agent_config_toml, register_device
from server.load_generator import LoadGenerator, Target, describe, load_samples
from server.report_text import report_table
from server.rollout_cli import status_table
from server.rollouts import RolloutStatus, rollout_status, start_rollout
from server.roots import ROOT_FILE, RootStore, write_root_file
from server.selection import Selection
from server.setup import init_data_dir
from shared.errors import UserInputError
from shared.files import write_private
from shared.inference_client import SERVE_FILE

MARKER = ".edgefleet-demo"
FLEET = (("pi4-kitchen", "rpi4"), ("nano-dock", "jetson-nano"), ("nuc-lab", "x86-64"))
AGENT_LISTEN = "127.0.0.1:0"  # each agent's endpoint on a free port; the agent writes it to its serve.json
REPORT_INTERVAL_S = 2.0  # the agents report their calls' latency this often, so the charts move
TRAFFIC_S = 12.0  # traffic before the latency table
TABLE_WINDOW_S = 10.0  # the table's latency and calls/s: the reports of this last span (all under traffic)


@dataclass
class Processes:
    running: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: list[str], log: Path) -> None:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "--log-level", "info", *args], stdout=out, stderr=subprocess.STDOUT
            )
        self.running.append((name, proc))

    def alive(self) -> bool:
        return all(proc.poll() is None for _, proc in self.running)

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


def _wait_listening(port: int, processes: Processes, timeout: float = 15.0) -> None:
    if not wait_listening(port, processes.alive, timeout):
        processes.check()  # says which one exited
        raise click.ClickException(f"the broker did not listen on port {port} within {timeout:.0f} s; see its log")


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


def _traffic(generator: LoadGenerator, db: object, processes: Processes, rate: float) -> None:
    """Start the traffic, wait for a few reports, print the on-device latency table from it."""
    from rich.console import Console

    from server.db import Database
    from server.top import fleet_rows, top_table

    assert isinstance(db, Database)
    generator.start()
    click.echo(f"traffic    {rate:g} calls/s to each agent's endpoint (POST /v1/infer, the digits eval samples); "
               f"the agents report every {REPORT_INTERVAL_S:g} s; {TRAFFIC_S:g} s ...")
    deadline = time.monotonic() + TRAFFIC_S
    while time.monotonic() < deadline:
        processes.check()
        time.sleep(0.5)
    now = time.time()
    counts = generator.counts()
    click.echo("")
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
    console.print(top_table(fleet_rows(db, window_s=TABLE_WINDOW_S, now=now), window_s=TABLE_WINDOW_S, now=now,
                            title="on-device latency from the traffic (edgefleet top)"))
    click.echo("")
    click.echo(f"traffic    {sum(c.ok for c in counts.values())} calls answered, "
               f"{sum(c.errors for c in counts.values())} errors, in {TRAFFIC_S:g} s:")
    for line in describe(counts):
        click.echo(f"             {line}")
    click.echo("")


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("edgefleet-demo"),
              show_default=True, help="Where the demo keeps its broker, server and agent files (recreated).")
@click.option("--once", is_flag=True,
              help="Stop everything (the dashboard too) and exit after printing the table.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the rollout.")
@click.option("--rate", type=click.FloatRange(min=0.0, min_open=True), default=20.0, show_default=True,
              help="Calls per second the load generator sends to each agent's endpoint.")
def demo_command(workdir: Path, once: bool, timeout: float, rate: float) -> None:
    """Run a local demo fleet: broker, server, three agents, a real compressed rollout, traffic."""
    from server.compress.digits import write_demo_inputs

    workdir = _fresh_workdir(workdir)
    logs = workdir / "logs"
    logs.mkdir()
    processes = Processes()
    try:
        workspace = init_data_dir(workdir / "server")
        keys = workspace.keys()
        # the fleet's own broker, as 'edgefleet init' and 'edgefleet broker' set it up for a single box
        layout = BrokerLayout(workspace.data_dir.broker)
        settings, _ = setup_broker(layout, hosts=("127.0.0.1",), listen=f"127.0.0.1:{free_port()}")
        processes.start("broker", ["broker", "--data-dir", str(workspace.data_dir.root)], logs / "broker.log")
        _wait_listening(settings.port, processes)
        click.echo(f"broker     {settings.device_url()} (the fleet's Mosquitto: TLS with its own CA, an identity and "
                   "topic ACLs per device, no anonymous access)")
        dashboard = f"127.0.0.1:{free_port()}"
        dashboard_url = f"http://{dashboard}/"
        processes.start("server", ["server", "--data-dir", str(workspace.data_dir.root), "--http", dashboard],
                        logs / "server.log")
        click.echo(f"server     data dir {workspace.data_dir.root}")
        agents = workdir / "agents"
        for name, profile in FLEET:
            password, hashed = new_identity()
            device = register_device(workspace.db, name, profile, broker_secret=hashed)
            sync_broker(workspace.db, layout)
            identity = write_device_files(layout, device.id, name, password, settings.device_url(), agents)
            write_root_file(RootStore(workspace.data_dir.keys), agents / ROOT_FILE)
            config = agents / f"{name}.toml"
            write_private(config, agent_config_toml(device, identity, agents / name, serve_listen=AGENT_LISTEN,
                                                    report_interval_s=REPORT_INTERVAL_S).encode())
            processes.start(name, ["agent", "--config", str(config)], logs / f"{name}.log")
            click.echo(f"agent      {name} ({profile}), its own broker identity")
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
        generator = LoadGenerator([Target(name, workdir / "agents" / name / SERVE_FILE) for name, _ in FLEET],
                                  load_samples(eval_path), rate_per_s=rate)
        try:
            _traffic(generator, workspace.db, processes, rate)
            device_url = f"{dashboard_url}devices/{FLEET[0][0]}"
            if once:  # everything stops as this returns: the dashboard too, so no address to visit
                click.echo(f"dashboard  was served at {dashboard_url} (a device: {device_url}) during the run; "
                           "run without --once to keep it up")
                return
            if _serving(dashboard_url):
                click.echo(f"dashboard  {dashboard_url} (until Ctrl-C)")
                click.echo(f"device     {device_url} (its latency chart moves with the traffic)")
            else:
                click.echo(f"dashboard  not answering at {dashboard_url}; see {logs / 'server.log'}")
            click.echo(f"the fleet keeps running, and the traffic at {rate:g} calls/s per agent; press Ctrl-C to stop")
            stop = {"now": False}

            def on_signal(signum: int, frame: FrameType | None) -> None:
                stop["now"] = True

            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
            while not stop["now"]:
                processes.check()
                time.sleep(0.5)
        finally:
            generator.stop()
        counts = generator.counts()
        click.echo(f"traffic    {sum(c.ok for c in counts.values())} calls answered in all, "
                   f"{sum(c.errors for c in counts.values())} errors")
    finally:
        processes.stop()
