"""Fleet benchmark: wave rollouts to thousands of simulated devices on a real broker, per database and replica count.

    python bench/fleet.py [--devices 1000,5000,10000] [--backends sqlite,postgresql] [--replicas 1,2]
                          [--processes 2] [--waves 1%,10%,100%] [--quick] [--keep]

For each (devices N, backend, replicas R), in a fresh temporary directory,
through the ``edgefleet`` CLI as an operator would: the fleet broker
(``edgefleet broker``: TLS, anonymous access off, a broker identity per
device), ``init``, a profile ``benchbox`` with one fixed recipe (float32),
the digits classifier added and built, N devices registered with
``device register-fleet``; then R ``edgefleet server`` replicas (SQLite: one;
PostgreSQL: a private, durable cluster from ``tests/pg.py``) and
``edgefleet simulate`` playing the N devices (the real agent code per device:
signature and root checks, chunked download, slots, outbox, state reports;
trials answered by the stand-in runtime). Once every device is online, an
MQTT client with its own device identity counts every artifact chunk the
broker delivers, and ``edgefleet rollout start`` rolls the model out in
waves; the database is polled until every device committed.

Columns:

- **devices / backend / replicas**: the configuration;
- **online after s**: from starting the servers and the simulator to every
  device online in the database (not part of the rollout time);
- **start → all committed s**: from invoking ``rollout start`` to the last
  commit the server recorded;
- **devices/min** and **vs AWS IoT Jobs**: N ÷ that time, and that ÷ 1,000
  devices/min, the documented maximum rollout rate of an AWS IoT job
  (``maximumPerMinute``);
- **directives ÷ devices**: install directives the rollout sent ÷ N (1.00:
  none sent twice);
- **egress ÷ artifact**: chunk payload bytes delivered to the counting client
  ÷ the artifact (model + eval file): 1.00 means each chunk went out once for
  the whole fleet;
- **rows/s**: event and telemetry rows the server stored during the rollout ÷
  its duration (the offered load, not the ingest ceiling: bench/ingest.py
  measures that);
- **server CPU**: CPU seconds of every replica during the rollout ÷ its
  duration (1.00 = one core busy); **peak RSS MiB**: the largest replica's
  high-water mark over its life;
- **simulator MiB/1,000**: the simulator processes' high-water marks added
  up, per 1,000 devices (what a laptop needs to play the fleet);
- **result**: ``ok``, or why the row has no numbers.

Everything (broker, PostgreSQL, servers, simulator) shares this host's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import load_config
from bench.chunk_monitor import ChunkMonitor, MonitorError
from bench.rollout import (
    Trained,
    artifact_files,
    last_commit_and_waves,
    peak_rss_bytes,
    read_only_database,
    train_model,
)
from bench.tables import markdown_table
from server.db import Database, open_database
from server.db.models import Deployment, Device, EventRecord, TelemetryRecord
from server.rollouts import parse_waves
from tests.fleet_broker import FleetBroker
from tests.pg import PostgresServer

PROFILE = "benchbox"
AWS_IOT_JOBS_MAX_PER_MIN = 1000  # AWS IoT Jobs' documented maximum rollout rate (maximumPerMinute)
DEFAULT_DEVICES = (1000, 5000, 10000)
DEFAULT_WAVES = "1%,10%,100%"
POLL_S = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchFailure(Exception):
    """This configuration could not be measured; the message says why (it becomes the row's result)."""


@dataclass(frozen=True)
class Config:
    devices: int
    backend: str
    replicas: int

    def label(self) -> str:
        return f"{self.devices} devices, {self.backend}, {self.replicas} replica(s)"


@dataclass
class Row:
    config: Config
    result: str = "ok"
    online_s: float | None = None
    seconds: float | None = None
    egress_ratio: float | None = None
    rows_per_s: float | None = None
    server_cpu: float | None = None
    peak_rss: int | None = None
    installs: int | None = None  # install directives sent: one per device unless some device got it twice
    simulator_peak: int | None = None  # bytes, the simulator's processes added up


def cli(env: dict[str, str], *args: str, timeout: float = 900) -> str:
    done = subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise BenchFailure(f"edgefleet {' '.join(args[:2])} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


class FleetRun:
    def __init__(self, config: Config, root: Path, model: Trained, waves: str, processes: int) -> None:
        self.config, self.root, self.model, self.waves, self.processes = config, root, model, waves, processes
        self.data_dir = root / "server"
        self.env = {**os.environ}
        self.env.pop("EDGEFLEET_FAILPOINTS", None)
        self.postgres: PostgresServer | None = None
        self.broker: FleetBroker | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.db: Database | None = None
        self.online_s: float | None = None
        self.installs = 0

    def say(self, text: str) -> None:
        print(f"  [{self.config.label()}] {text}", file=sys.stderr, flush=True)

    def data(self) -> str:
        return str(self.data_dir)

    def prepare(self) -> str:
        started = time.monotonic()
        if self.config.backend == "postgresql":
            self.postgres = PostgresServer(durable=True).start()
            self.env["EDGEFLEET_DB_URL"] = self.postgres.create_database("edgefleet")
        self.broker = FleetBroker(self.data_dir)
        cli(self.env, "init", "--data-dir", self.data(), "--release-key", "online", "--broker-host", "127.0.0.1",
            "--broker-listen", self.broker.listen)
        self.broker.start()
        cli(self.env, "profile", "add", PROFILE, "--quantizations", "float32", "--recipe", "float32",
            "--data-dir", self.data())
        ref = cli(self.env, "model", "add", "digits", "--file", str(self.model.model), "--eval", str(self.model.eval),
                  "--data-dir", self.data()).split()[0]
        cli(self.env, "model", "build", ref, "--profile", PROFILE, "--data-dir", self.data())
        cli(self.env, "device", "register-fleet", "--prefix", "sim", "--count", str(self.config.devices),
            "--profile", PROFILE, "--out-dir", str(self.root / "configs"), "--data-dir", self.data())
        # the chunk counter's own identity (a device that never runs an agent: not in the rollout's selection)
        cli(self.env, "device", "register-fleet", "--prefix", "watch", "--count", "1", "--profile", "x86-64",
            "--out-dir", str(self.root / "watcher"), "--data-dir", self.data())
        url = self.env.get("EDGEFLEET_DB_URL")
        self.db = open_database(url) if url else read_only_database(self.data_dir)
        self.say(f"set up in {time.monotonic() - started:.0f} s")
        return ref

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "edgefleet", *args], stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env)
        log.close()

    def assert_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.root / f"{name}.log").read_text(errors="replace")[-1500:]
                raise BenchFailure(f"{name} exited with {proc.returncode}: {tail.strip().splitlines()[-1:]}")

    def servers(self) -> list[subprocess.Popen[bytes]]:
        return [proc for name, proc in self.procs.items() if name.startswith("server")]

    def start_fleet(self) -> None:
        assert self.db is not None
        started = time.monotonic()
        for i in range(self.config.replicas):
            self.start(f"server-{i}", "--log-level", "warning", "server", "--data-dir", self.data(), "--http", "off",
                       "--replica", "main" if i == 0 else f"r{i}")
        self.start("simulate", "--log-level", "warning", "simulate", "--configs", str(self.root / "configs"),
                   "--processes", str(self.processes), "--json")
        timeout = 120 + self.config.devices / 50
        while True:
            self.assert_alive()
            with self.db.reading() as session:
                online = session.scalar(select(func.count()).select_from(Device).where(
                    Device.online.is_(True), Device.name.like("sim-%")))
            if online == self.config.devices:
                break
            if time.monotonic() - started > timeout:
                raise BenchFailure(f"only {online} of {self.config.devices} devices online after {timeout:.0f} s")
            time.sleep(POLL_S)
        self.online_s = time.monotonic() - started
        self.say(f"all online after {self.online_s:.1f} s")

    def stored_rows(self) -> int:
        assert self.db is not None
        with self.db.reading() as session:
            return sum(session.scalar(select(func.count()).select_from(t)) or 0 for t in (EventRecord, TelemetryRecord))

    def roll_out(self, ref: str) -> Row:
        assert self.db is not None
        watcher = load_config(next((self.root / "watcher").glob("*.toml")))
        monitor = ChunkMonitor(watcher.broker_address())
        monitor.start()
        try:
            rows_before = self.stored_rows()
            cpu_before = sum(cpu_seconds(p.pid) for p in self.servers())
            started = time.time()
            rollout_id = cli(self.env, "rollout", "start", ref, "--profile", PROFILE, "--waves", self.waves,
                             "--data-dir", self.data()).strip()
            self.say(f"{rollout_id} started")
            self.wait_committed(rollout_id, started)
            cpu = sum(cpu_seconds(p.pid) for p in self.servers()) - cpu_before
            rows = self.stored_rows() - rows_before
            time.sleep(1.0)  # chunks still in flight to the monitor
        finally:
            monitor.stop()
        last, _ = last_commit_and_waves(self.db, rollout_id)
        seconds = last - started
        files = artifact_files(self.db, rollout_id)
        sent = monitor.bytes_by_file()
        peak = max((peak_rss_bytes(p.pid) or 0) for p in self.servers())
        simulator = self.procs["simulate"].pid
        simulator_peak = sum(peak_rss_bytes(pid) or 0 for pid in [simulator, *child_pids(simulator)])
        return Row(self.config, online_s=self.online_s, seconds=seconds,
                   egress_ratio=sum(sent[sha] for sha in files) / sum(files.values()),
                   rows_per_s=rows / seconds, server_cpu=cpu / seconds, peak_rss=peak, installs=self.installs,
                   simulator_peak=simulator_peak)

    def wait_committed(self, rollout_id: str, started: float) -> None:
        assert self.db is not None
        timeout = 300 + self.config.devices / 10
        last_line = ""
        while True:
            self.assert_alive()
            with self.db.reading() as session:
                counts = dict(session.execute(select(Deployment.state, func.count()).where(
                    Deployment.rollout_id == rollout_id, Deployment.kind == "install").group_by(Deployment.state)).all())
                committed = session.scalar(select(func.count(func.distinct(Deployment.device_id))).where(
                    Deployment.rollout_id == rollout_id, Deployment.kind == "install",
                    Deployment.state == "committed")) or 0
            line = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            if line != last_line:
                self.say(f"{time.time() - started:6.1f} s  {line} ({committed} devices committed)")
                last_line = line
            if committed == self.config.devices:
                self.installs = sum(counts.values())
                return
            if counts.get("failed") or counts.get("cancelled"):
                raise BenchFailure(f"deployments failed: {line}")
            if time.time() - started > timeout:
                raise BenchFailure(f"after {timeout:.0f} s: {line}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.db is not None:
            self.db.close()
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()


def measure(config: Config, model: Trained, root: Path, waves: str, processes: int) -> Row:
    if config.backend == "sqlite" and config.replicas > 1:
        return Row(config, result="refused: one server per SQLite file (by design)")
    run = FleetRun(config, root, model, waves, processes)
    try:
        ref = run.prepare()
        run.start_fleet()
        return run.roll_out(ref)
    except (BenchFailure, MonitorError, subprocess.TimeoutExpired) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        run.say(f"FAILED: {why}")
        return Row(config, result=why, online_s=run.online_s)
    finally:
        run.stop()


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[Row], file: TextIO = sys.stdout) -> None:
    header = ["devices", "backend", "replicas", "online after s", "start → all committed s", "devices/min",
              "vs AWS IoT Jobs (1,000/min)", "directives ÷ devices", "egress ÷ artifact", "rows/s",
              "server CPU (cores)", "peak RSS MiB", "simulator MiB/1,000", "result"]
    lines = []
    for row in rows:
        rate = row.config.devices / row.seconds * 60 if row.seconds else None
        lines.append([
            str(row.config.devices), row.config.backend, str(row.config.replicas), cell(row.online_s, ".1f"),
            cell(row.seconds, ".1f"), cell(rate, ".0f"),
            f"{rate / AWS_IOT_JOBS_MAX_PER_MIN:.2f}x" if rate else "-",
            cell(row.installs / row.config.devices if row.installs else None, ".2f"), cell(row.egress_ratio, ".2f"),
            cell(row.rows_per_s, ".0f"), cell(row.server_cpu, ".2f"),
            cell(row.peak_rss / 2**20 if row.peak_rss else None, ".0f"),
            cell(row.simulator_peak / 2**20 / row.config.devices * 1000 if row.simulator_peak else None, ".0f"),
            row.result,
        ])
    print(markdown_table(header, lines), file=file, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=",".join(map(str, DEFAULT_DEVICES)), help="comma-separated fleet sizes")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts (PostgreSQL only for >1)")
    parser.add_argument("--processes", type=int, default=2, help="simulator processes")
    parser.add_argument("--waves", default=DEFAULT_WAVES, help="the rollout's waves")
    parser.add_argument("--quick", action="store_true", help="200 devices, both backends, 1 and 2 replicas")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, databases)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    sizes = [200] if args.quick else [int(n) for n in args.devices.split(",") if n.strip()]
    parse_waves(args.waves)
    configs = [Config(n, backend, replicas) for n in sizes for backend in args.backends.split(",")
               for replicas in map(int, args.replicas.split(","))
               if not (backend == "sqlite" and replicas > 1 and len(args.replicas.split(",")) > 1)]
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-fleet-bench-"))
    rows: list[Row] = []
    run_started = time.monotonic()
    try:
        model = train_model(tmp)
        for i, config in enumerate(configs):
            started = time.monotonic()
            rows.append(measure(config, model, tmp / f"run-{i}", args.waves, args.processes))
            print(f"  [{config.label()}] done in {time.monotonic() - started:.0f} s wall", file=sys.stderr)
            print_table(rows, file=sys.stderr)  # so far: a long run stopped early still leaves its rows
    finally:
        if args.keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([{**vars(r.config), **{k: v for k, v in vars(r).items() if k != "config"}}
                                         for r in rows], indent=2))
    print(f"\nhost: {os.cpu_count()} cores, shared by the broker, PostgreSQL, the servers and the simulator "
          f"({args.processes} processes); waves {args.waves}; run took {time.monotonic() - run_started:.0f} s\n")
    print_table(rows)


if __name__ == "__main__":
    main()
