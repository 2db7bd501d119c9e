"""Telemetry ingest at broker speed: rows the server commits per second vs what the broker moves.

    python bench/ingest.py [--quick] [--messages N] [--devices D]

One private Mosquitto on a free port serves every row. First the raw rate: D
``mosquitto_pub -l`` processes publish N telemetry-sized messages at QoS 1
into one ``mosquitto_sub -C N`` (the baseline: nothing but the broker and
its standard clients). Then the real ``ServerService`` loop ingests N trial
telemetry messages published the same way (D ``mosquitto_pub -l``, one per
registered device, each on its own device's topic) into SQLite (the data
directory's file, synchronous=FULL) and into a private durable PostgreSQL
(``tests/pg.py``, fsync on): rows committed per second from the first
publish to the last row, and every row checked to be there exactly once
(count and distinct (device, boot, seq)). The ``batch 1`` rows are the
per-message path (one transaction per message, as a server draining one
message at a time does), on fewer messages. Ratios are against the raw rate
measured in the same run with D publishers (a row with one publisher is there
for context). Target: batched ingest >= 0.25x raw. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import func, select

from bench.tables import markdown_table
from server import service as service_module
from server.broker import Mosquitto
from server.db.models import Device, ServerReplica, TelemetryRecord
from server.replicas import REPLICA_SESSION_EXPIRY_S
from server.service import ServerService
from server.setup import Workspace, init_data_dir
from shared import PROTOCOL_VERSION
from shared.messages import BenchmarkResult, Telemetry, encode_payload
from shared.mqtt import BrokerAddress
from shared.topics import TopicKind, device_topic
from tests.pg import PostgresServer

TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Row:
    what: str
    messages: int
    seconds: float
    exact: str  # "yes" when every row is there exactly once; "-" for the raw rate


def telemetry_payload(device_id: str, seq: int) -> bytes:
    bench = BenchmarkResult(runtime="ai_edge_litert 1.2.0", threads=2, init_ms=3.1, first_ms=1.4, warmup_runs=1,
                            runs=50, mean_ms=0.21, std_ms=0.05, min_ms=0.11, max_ms=0.51, p50_ms=0.21, p90_ms=0.3,
                            p95_ms=0.34, p99_ms=0.4, peak_rss_bytes=80_000_000)
    message = Telemetry(v=PROTOCOL_VERSION, device_id=device_id, boot_id="bench-boot", seq=seq, deployment_id=None,
                        kind="trial", ts=1_700_000_000.0 + seq, benchmark=bench, accuracy=0.975, samples=200)
    payload = encode_payload(message)
    assert b"\n" not in payload
    return payload


def write_lines(path: Path, device_id: str, count: int) -> Path:
    path.write_bytes(b"".join(telemetry_payload(device_id, seq) + b"\n" for seq in range(1, count + 1)))
    return path


def publishers(broker: Mosquitto, jobs: list[tuple[str, Path]]) -> list[subprocess.Popen[bytes]]:
    """One ``mosquitto_pub -l`` per (topic, file of lines), all at QoS 1."""
    procs = []
    for topic, lines in jobs:
        with open(lines, "rb") as stdin:
            procs.append(subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                                           "-t", topic, "-l"], stdin=stdin, stderr=subprocess.PIPE))
    return procs


def wait_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"mosquitto_pub failed: {err.decode(errors='replace')}")


def raw_rate(broker: Mosquitto, workdir: Path, messages: int, devices: int) -> Row:
    """mosquitto_pub -> mosquitto_sub on the same broker: the most this broker moves with standard clients."""
    per = messages // devices
    files = [(f"bench/raw/{i}", write_lines(workdir / f"raw-{i}.lines", f"raw-{i}", per)) for i in range(devices)]
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", "bench/raw/#"],
                           stdout=subprocess.PIPE)
    received = [0]
    first = threading.Event()
    done = threading.Event()
    target = [per * devices + 10**9]

    def read() -> None:
        assert sub.stdout is not None
        for _line in sub.stdout:
            received[0] += 1
            first.set()
            if received[0] >= target[0]:
                done.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        while not first.wait(0.2):  # the subscription is in place once a probe comes through
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t",
                            "bench/raw/probe", "-m", "probe"], check=True)
        time.sleep(0.5)  # probes still in flight arrive before the clock starts
        target[0] = received[0] + per * devices
        start = time.monotonic()
        wait_all(publishers(broker, files))
        if not done.wait(TIMEOUT_S):
            raise TimeoutError(f"mosquitto_sub got {received[0]} of {target[0]} messages")
        seconds = time.monotonic() - start
    finally:
        sub.kill()
        sub.wait()
    return Row(f"raw mosquitto_pub x{devices} -> mosquitto_sub", per * devices, seconds, "-")


def registered_devices(workdir: Path, db_url: str | None, devices: int, per: int) -> tuple[Workspace, list[tuple[str, Path]]]:
    """A new data directory with ``devices`` registered devices, and each one's ``per`` reports to publish."""
    workspace = init_data_dir(workdir / "data", db_url=db_url)
    ids = [f"bench-{i:04d}" for i in range(devices)]
    with workspace.db.session() as session:
        session.add_all(Device(id=device_id, name=device_id, profile_name="x86-64") for device_id in ids)
    files = [(device_topic(TopicKind.TELEMETRY, device_id), write_lines(workdir / f"{device_id}.lines", device_id, per))
             for device_id in ids]
    return workspace, files


def server_rate(broker: Mosquitto, workdir: Path, what: str, db_url: str | None, messages: int, devices: int,
                batch: int) -> Row:
    """The real server loop ingesting ``messages`` trial telemetry reports from ``devices`` registered devices."""
    per = messages // devices
    workspace, files = registered_devices(workdir, db_url, devices, per)
    service = ServerService(workspace.data_dir, BrokerAddress.parse(broker.url), db=workspace.db)
    saved_batch, service_module.BATCH = service_module.BATCH, batch
    thread = threading.Thread(target=service.run, name="server-loop", daemon=True)
    thread.start()
    try:
        if not service.link.wait_connected(10):
            raise TimeoutError("the server did not connect")
        time.sleep(0.3)  # its subscriptions, sent on connect, are in place
        start = time.monotonic()
        wait_all(publishers(broker, files))
        deadline = start + TIMEOUT_S
        while (stored := _count(workspace)) < per * devices:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {stored} of {per * devices} rows after {TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        seconds = time.monotonic() - start
    finally:
        service.stop()
        thread.join(15)
        service_module.BATCH = saved_batch
    return Row(what, per * devices, seconds, _exactly_once(workspace, per * devices))


def replicas_rate(broker: Mosquitto, workdir: Path, what: str, db_url: str | None, messages: int, devices: int,
                  replicas: int) -> Row:
    """Like ``server_rate``, with ``edgefleet server`` processes as an operator runs them: one on SQLite, or
    ``replicas`` on one PostgreSQL database, splitting the reports through MQTT 5 shared subscriptions."""
    per = messages // devices
    workspace, files = registered_devices(workdir, db_url, devices, per)
    env = {**os.environ, **({"EDGEFLEET_DB_URL": db_url} if db_url else {})}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "--log-level", "warning", "server", "--data-dir", str(workdir / "data"),
         "--broker", broker.url, "--http", "off", "--replica", "main" if i == 0 else f"r{i}"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / f"server-{i}.log", "wb"))  # noqa: SIM115
        for i in range(replicas)]
    try:
        _wait_subscribed(workspace, workdir, replicas)
        start = time.monotonic()
        wait_all(publishers(broker, files))
        deadline = start + TIMEOUT_S
        while (stored := _count(workspace)) < per * devices:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise TimeoutError(f"{what}: {stored} of {per * devices} rows ({workdir}/server-*.log)")
            time.sleep(0.1)
        seconds = time.monotonic() - start
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        # Until their sessions expire, Mosquitto routes a share of $share/edgefleet/… to these stopped
        # replicas (agents would resend it; mosquitto_pub does not): the next row starts without them.
        time.sleep(REPLICA_SESSION_EXPIRY_S + 2)
    return Row(what, per * devices, seconds, _exactly_once(workspace, per * devices))


def _wait_subscribed(workspace: Workspace, workdir: Path, replicas: int) -> None:
    """Until every server process registered itself (it does so before it connects), then a little longer
    for the connect, its subscriptions and the first engine tick."""
    db = workspace.db
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with db.reading() as session:
            if (session.scalar(select(func.count()).select_from(ServerReplica)) or 0) >= replicas:
                time.sleep(3.0)
                return
        time.sleep(0.2)
    raise TimeoutError(f"the server processes did not start ({workdir}/server-*.log)")


def _exactly_once(workspace: Workspace, expected: int) -> str:
    db = workspace.db
    with db.reading() as session:
        rows = session.scalar(select(func.count()).select_from(TelemetryRecord))
        distinct = session.scalar(select(func.count()).select_from(
            select(TelemetryRecord.device_id, TelemetryRecord.boot_id, TelemetryRecord.seq).distinct().subquery()))
    db.close()
    return "yes" if rows == distinct == expected else f"NO ({rows} rows, {distinct} distinct)"


def _count(workspace: Workspace) -> int:
    db = workspace.db
    with db.reading() as session:
        return int(session.scalar(select(func.count()).select_from(TelemetryRecord)) or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    messages = args.messages or (4000 if args.quick else 40_000)
    single = max(args.devices, messages // 20)  # the per-message path is slow: fewer messages
    for tool in ("mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install mosquitto-clients (scripts/bootstrap.sh does)")
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ingest-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker").start()
        postgres = PostgresServer(durable=True).start()
        try:
            rows = [raw_rate(broker, _dir(root, "raw"), messages, args.devices)]
            rows.append(raw_rate(broker, _dir(root, "raw-1"), messages, 1))  # context: one publisher
            rows.append(server_rate(broker, _dir(root, "sqlite"), f"server, SQLite, batch {service_module.BATCH}",
                                    None, messages, args.devices, service_module.BATCH))
            rows.append(server_rate(broker, _dir(root, "pg"), f"server, PostgreSQL, batch {service_module.BATCH}",
                                    postgres.create_database(), messages, args.devices, service_module.BATCH))
            rows.append(replicas_rate(broker, _dir(root, "proc-sqlite"), "edgefleet server process, SQLite", None,
                                      messages, args.devices, 1))
            rows.append(replicas_rate(broker, _dir(root, "proc-pg-1"), "edgefleet server process, PostgreSQL",
                                      postgres.create_database(), messages, args.devices, 1))
            rows.append(replicas_rate(broker, _dir(root, "proc-pg-2"), "2 edgefleet server replicas, PostgreSQL",
                                      postgres.create_database(), messages, args.devices, 2))
            rows.append(server_rate(broker, _dir(root, "sqlite-1"), "server, SQLite, batch 1 (per message)", None,
                                    single, args.devices, 1))
            rows.append(server_rate(broker, _dir(root, "pg-1"), "server, PostgreSQL, batch 1 (per message)",
                                    postgres.create_database(), single, args.devices, 1))
        finally:
            postgres.stop()
            broker.stop()
    raw = rows[0].messages / rows[0].seconds
    print(markdown_table(
        ["path", "messages", "seconds", "rows/s", "vs raw", "each row once"],
        [[r.what, str(r.messages), f"{r.seconds:.2f}", f"{r.messages / r.seconds:,.0f}",
          f"{r.messages / r.seconds / raw:.2f}x", r.exact] for r in rows]))


def _dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir()
    return path


if __name__ == "__main__":
    main()
