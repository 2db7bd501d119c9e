"""Fleet rollout benchmark: how long one rollout takes to reach N real agent processes, and what it costs in egress.

    python bench/rollout.py [--agents 5,20,50 | --quick] [--waves 1,10%,50%,100%] [--keep]

For each N, in a fresh temporary directory, through the ``edgefleet`` CLI as
an operator would (``tests/e2e/fleet.py``): a private Mosquitto, ``init``, a
profile ``benchbox`` with one fixed recipe (float32: nothing to choose, a fast
build), N registered devices, the model added and built for the profile
*before* anything is timed, then the server and N agent processes (the quick
trial settings of the end-to-end tests). Once every device is online, an MQTT
monitor client subscribes to every chunk (``ef/v1/artifacts/+/chunks/+``, QoS
1) and ``edgefleet rollout start`` rolls the model out in waves; the database
is polled (read-only, in this process) until the rollout succeeded. A
rollout that rolls back, pauses or outlives ``--timeout`` fails its row
loudly (its status goes to stderr); an N whose agents cannot all come online
within ``--startup-timeout`` gets a row saying so. The devices start with no
model, so no trial compares against a replaced one. The model is a small
dense digits classifier trained once per run (64-256-10, float32).

Columns:

- **agents**: N agent processes, each a separate Python process (its trial
  runs in a child process of its own), all on this host with the broker and
  the server;
- **online after s**: from starting the server and the agents to every device
  online in the server's database (not part of the rollout time);
- **start → all committed s**: from invoking ``edgefleet rollout start`` to
  the last device's commit as the server recorded it (includes the CLI's own
  start-up and planning, shown in **of which CLI s**);
- **devices/min**: N ÷ that time;
- **waves**: how many, and each wave's cumulative device count;
- **wave s**: each wave's duration, from the engine starting it to its gate
  passing (the server's timestamps);
- **egress ÷ artifact**: chunk payload bytes the monitor received on the
  artifact topics (what the server published) ÷ the artifact (model file +
  eval file, from the signed manifest): 1.00 means each chunk went out once
  for the whole fleet;
- **load**: the host's 1-minute load average just before ``rollout start``
  (this host may be shared: anything above the cores it has slows every
  process here, and the row with it);
- **peak server RSS MiB**: the server process's high-water mark (VmHWM) over
  its whole life, read just before it is stopped;
- **time vs N₀**: start → all committed ÷ that of the smallest N measured in
  the same run;
- **result**: ``ok``, or why the row has no numbers.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, event, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chunk_monitor import ChunkMonitor, MonitorError
from bench.tables import markdown_table
from server.broker import Mosquitto
from server.db import DB_FILENAME, Database, queries
from server.db.models import Deployment, Wave
from server.devices import list_devices
from server.rollouts import parse_waves, rollout_status
from server.rollouts.read_model import status_json
from shared.errors import EdgefleetError
from shared.messages import Manifest
from shared.protocol import decode_versioned
from tests.e2e.fleet import QUICK_AGENT_TOML, Fleet, cli, wait_for

PROFILE = "benchbox"
MODEL = "digits"
DEFAULT_AGENTS = (5, 20, 50)
DEFAULT_WAVES = "1,10%,50%,100%"
AGENT_TOML = QUICK_AGENT_TOML
POLL_S = 0.5


class BenchFailure(Exception):
    """This N could not be measured; the message says why (it becomes the row's result)."""


@dataclass(frozen=True)
class Row:
    agents: int
    result: str = "ok"
    online_s: float | None = None
    seconds: float | None = None  # rollout start -> last commit
    cli_s: float | None = None
    waves: tuple[int, ...] = ()
    wave_s: tuple[float, ...] = ()
    artifact_bytes: int = 0
    egress_bytes: int = 0
    stray_bytes: int = 0  # chunks of files the rollout's manifests do not name
    peak_rss: int | None = None
    load: float | None = None


def read_only_database(data_dir: Path) -> Database:
    """The server's SQLite file opened read-only, each session a deferred snapshot transaction.

    Not ``open_workspace``: its sessions begin with ``BEGIN IMMEDIATE`` (the write lock, even to
    read), so a poll competes with the server for the lock; with 50 agents the server commits back
    to back and such a poll starved past the 10 s busy timeout ("database is locked"). In WAL mode
    a reader neither waits for the server nor holds it up.
    """
    engine = create_engine(f"sqlite:///file:{data_dir / DB_FILENAME}?mode=ro&uri=true")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN comes from _on_begin
        dbapi_connection.execute("PRAGMA busy_timeout=10000")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")  # deferred: a read snapshot from the first SELECT, no lock

    return Database(engine)


def _seconds(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def artifact_files(db: Database, rollout_id: str) -> dict[str, int]:
    """sha256 -> size of every file the rollout's signed manifests name (model and eval per profile)."""
    with db.session() as session:
        rollout = queries.rollout(session, rollout_id)
        assert rollout is not None
        manifests = [decode_versioned(Manifest, r.release.manifest["signed"]) for r in rollout.releases]
        return {f.sha256: f.size for m in manifests for f in m.files}


def last_commit_and_waves(db: Database, rollout_id: str) -> tuple[float, list[tuple[float, float]]]:
    """When the server recorded the rollout's last commit, and when each wave started and passed (epoch s)."""
    with db.session() as session:
        committed = session.scalars(select(Deployment.updated_at).where(
            Deployment.rollout_id == rollout_id, Deployment.kind == "install", Deployment.state == "committed"))
        last = max(_seconds(t) for t in committed)
        waves = session.scalars(select(Wave).where(Wave.rollout_id == rollout_id).order_by(Wave.index)).all()
        return last, [(_seconds(w.started_at), _seconds(w.decided_at)) for w in waves
                      if w.started_at is not None and w.decided_at is not None]


def peak_rss_bytes(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else None


@dataclass
class Trained:
    model: Path
    eval: Path


def train_model(directory: Path) -> Trained:
    """The digits classifier every N rolls out: trained once per run, saved as .keras with its eval file."""
    from server.compress.convert import import_keras
    from server.compress.digits import digits_split
    from server.compress.evalset import write_eval_file

    keras = import_keras()
    keras.utils.set_random_seed(0)
    train, test = digits_split()
    model = keras.Sequential([
        keras.Input(shape=(8, 8, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(train.x, train.y, epochs=20, batch_size=64, verbose=0)
    path = directory / "digits.keras"
    model.save(path)
    return Trained(path, write_eval_file(test, directory / "eval.npz"))


@dataclass
class Options:
    waves: str
    startup_timeout: float | None
    timeout: float | None
    keep: bool


@dataclass
class FleetRun:
    """One N: its directory, broker, fleet and the measurements taken so far."""

    agents: int
    root: Path
    model: Trained
    options: Options
    fleet: Fleet = field(init=False)
    online_s: float | None = None

    def say(self, text: str) -> None:
        print(f"  [{self.agents} agents] {text}", file=sys.stderr, flush=True)

    def data(self) -> str:
        return str(self.fleet.data_dir)

    def prepare(self) -> str:
        """Everything before the clock starts: workspace, profile, devices, the model added and built."""
        started = time.monotonic()
        self.fleet = Fleet(self.root, Mosquitto(self.root / "broker").start(), self.root / "server")
        cli("init", "--data-dir", self.data(), "--release-key", "online")
        cli("profile", "add", PROFILE, "--quantizations", "float32", "--recipe", "float32", "--data-dir", self.data())
        for i in range(self.agents):
            self.fleet.register(f"dev{i}", PROFILE, extra_toml=AGENT_TOML)
        ref = cli("model", "add", MODEL, "--file", str(self.model.model), "--eval", str(self.model.eval),
                  "--data-dir", self.data()).split()[0]
        cli("model", "build", ref, "--profile", PROFILE, "--data-dir", self.data())
        self.say(f"registered {self.agents} devices, added and built {ref} in {time.monotonic() - started:.0f} s")
        return ref

    def start_fleet(self, db: Database) -> None:
        timeout = self.options.startup_timeout or 60 + 3 * self.agents
        started = time.monotonic()
        self.fleet.start_server()
        for i in range(self.agents):
            self.fleet.start_agent(f"dev{i}")

        def online() -> bool:
            self.fleet.assert_alive()
            return all(d.online for d in list_devices(db))

        try:
            wait_for(online, timeout, "every agent to come online", every=POLL_S)
        except AssertionError as exc:
            if not str(exc).startswith("timed out"):
                raise  # an agent or the server died: measure() reports its log
            count = sum(d.online for d in list_devices(db))
            raise BenchFailure(f"only {count} of {self.agents} agents online after {timeout:g} s") from None
        self.online_s = time.monotonic() - started
        self.say(f"all online after {self.online_s:.1f} s")

    def roll_out(self, ref: str, db: Database) -> Row:
        monitor = ChunkMonitor(self.fleet.broker.url)
        monitor.start()
        try:
            load = os.getloadavg()[0]
            started = time.time()
            rollout_id = cli("rollout", "start", ref, "--profile", PROFILE, "--waves", self.options.waves,
                             "--data-dir", self.data()).strip()
            cli_s = time.time() - started
            self.say(f"{rollout_id} started ({cli_s:.1f} s in the CLI)")
            self.wait_succeeded(db, rollout_id, started)
            time.sleep(1.0)  # let chunks still in flight to the monitor arrive
        finally:
            monitor.stop()
        peak = peak_rss_bytes(self.fleet.processes["server"].pid)
        files = artifact_files(db, rollout_id)
        sent = monitor.bytes_by_file()
        last, waves = last_commit_and_waves(db, rollout_id)
        self.say("waves started at " + ", ".join(f"+{begun - started:.2f} s" for begun, _ in waves))
        for sha256, size in files.items():
            copies = ", ".join(f"+{t - started:.2f} s" for t in monitor.arrivals(sha256, 0))
            self.say(f"file {sha256[:12]}: {size} bytes, {sent[sha256]} published ({sent[sha256] / size:.2f}x); "
                     f"its chunk 0 arrived at {copies}")
        status = rollout_status(db, rollout_id)
        return Row(
            agents=self.agents, online_s=self.online_s, seconds=last - started, cli_s=cli_s,
            waves=tuple(w.target_count or 0 for w in status.waves),
            wave_s=tuple(passed - begun for begun, passed in waves),
            artifact_bytes=sum(files.values()), egress_bytes=sum(n for sha, n in sent.items() if sha in files),
            stray_bytes=sum(n for sha, n in sent.items() if sha not in files), peak_rss=peak, load=load,
        )

    def wait_succeeded(self, db: Database, rollout_id: str, started: float) -> None:
        timeout = self.options.timeout or 300 + 10 * self.agents
        last_line = ""
        while True:
            self.fleet.assert_alive()
            status = rollout_status(db, rollout_id)
            committed = sum(d.state == "committed" for d in status.devices)
            line = f"{status.state}: waves {'/'.join(w.state for w in status.waves)}, {committed} committed"
            if line != last_line:
                self.say(f"{time.time() - started:6.1f} s  {line}")
                last_line = line
            if status.state == "succeeded" and committed == self.agents:
                return
            if status.state != "running":  # rolled back, paused, aborted, failed, or succeeded short of N
                print(json.dumps(status_json(status), indent=2), file=sys.stderr)
                raise BenchFailure(f"rollout {status.state}: {status.state_reason} ({committed} committed)")
            if time.time() - started > timeout:
                print(json.dumps(status_json(status), indent=2), file=sys.stderr)
                raise BenchFailure(f"rollout still {status.state} after {timeout:.0f} s ({committed} committed)")
            time.sleep(POLL_S)

    def stop(self) -> None:
        if hasattr(self, "fleet"):
            self.fleet.stop()
            self.fleet.broker.stop()


# Why an N gets a row instead of numbers: ours, a CLI call that failed or a process that died (the harness
# asserts), a CLI call that hung, the database.
UNMEASURABLE = (BenchFailure, MonitorError, AssertionError, subprocess.TimeoutExpired, EdgefleetError)


def measure(agents: int, model: Trained, options: Options, root: Path) -> Row:
    run = FleetRun(agents, root, model, options)
    db: Database | None = None
    try:
        ref = run.prepare()
        db = read_only_database(run.fleet.data_dir)
        run.start_fleet(db)
        return run.roll_out(ref, db)
    except UNMEASURABLE as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        if not isinstance(exc, (BenchFailure, MonitorError)):
            print(exc, file=sys.stderr)
        run.say(f"FAILED: {why} (logs in {root}{'' if options.keep else ', removed at exit; --keep keeps them'})")
        return Row(agents, result=why, online_s=run.online_s)
    finally:
        run.stop()
        if db is not None:
            db.close()


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[Row]) -> None:
    measured = [r for r in rows if r.seconds is not None]
    base = measured[0] if measured else None
    header = ["agents", "online after s", "start → all committed s", "of which CLI s", "devices/min", "waves",
              "wave s", "egress ÷ artifact", "load", "peak server RSS MiB",
              f"time vs {base.agents if base else '-'} agents", "result"]
    lines = []
    for row in rows:
        ok = row.seconds is not None
        ratio = row.seconds / base.seconds if row.seconds and base and base.seconds else None
        lines.append([
            str(row.agents), cell(row.online_s, ".1f"), cell(row.seconds, ".1f"), cell(row.cli_s, ".1f"),
            cell(row.agents / row.seconds * 60 if ok and row.seconds else None, ".1f"),
            f"{len(row.waves)} ({','.join(map(str, row.waves))})" if row.waves else "-",
            "/".join(f"{s:.1f}" for s in row.wave_s) or "-",
            f"{row.egress_bytes / row.artifact_bytes:.2f}" if ok and row.artifact_bytes else "-",
            cell(row.load, ".1f"),
            cell(row.peak_rss / 2**20 if row.peak_rss else None, ".0f"),
            f"{ratio:.2f}x" if ratio is not None else "-",
            row.result,
        ])
    print(markdown_table(header, lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default=",".join(map(str, DEFAULT_AGENTS)), help="comma-separated fleet sizes")
    parser.add_argument("--quick", action="store_true", help="5 agents only (a smoke run)")
    parser.add_argument("--waves", default=DEFAULT_WAVES,
                        help=f"the rollout's waves [{DEFAULT_WAVES.replace('%', '%%')}]")
    parser.add_argument("--startup-timeout", type=float, default=None,
                        help="seconds for every agent to come online [60 + 3 per agent]")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for the rollout to succeed [300 + 10 per agent]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, databases)")
    args = parser.parse_args()
    agents = [5] if args.quick else [int(n) for n in args.agents.split(",") if n.strip()]
    parse_waves(args.waves)  # a typo fails now, not after the setup
    options = Options(args.waves, args.startup_timeout, args.timeout, args.keep)
    tmp = tempfile.mkdtemp(prefix="edgefleet-rollout-bench-")
    rows: list[Row] = []
    run_started = time.monotonic()
    try:
        started = time.monotonic()
        model = train_model(Path(tmp))
        print(f"  trained the digits classifier in {time.monotonic() - started:.0f} s", file=sys.stderr)
        for n in agents:
            started = time.monotonic()
            rows.append(measure(n, model, options, Path(tmp) / f"agents-{n}"))
            print(f"  [{n} agents] done in {time.monotonic() - started:.0f} s wall", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    artifact = next((r.artifact_bytes for r in rows if r.artifact_bytes), 0)
    artifact_text = f"{artifact / 1024:.0f} KiB" if artifact else "-"
    stray = sum(r.stray_bytes for r in rows)
    print(f"\nhost: {os.cpu_count()} cores; Mosquitto, the server and every agent (and its trial child) on this host; "
          f"waves {args.waves}; artifact {artifact_text} (model + eval file, float32); "
          f"run took {time.monotonic() - run_started:.0f} s; ratios against the smallest N in the same run"
          + (f"; {stray} chunk bytes of files no manifest names (not in the ratio)" if stray else "") + "\n")
    print_table(rows)
    if any(r.result != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
