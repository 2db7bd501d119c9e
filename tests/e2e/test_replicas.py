"""Two server replicas on one PostgreSQL database and one fleet broker, with three agents.

Every process is real and started through the CLI: PostgreSQL (``tests/pg.py``),
``edgefleet broker`` (Mosquitto with per-device identities and ACLs: each
replica connects as its own identity), two ``edgefleet server --replica``
processes and three agents. A two-wave rollout must complete with no
duplicate directive, no report stored twice or lost, each wave started and
decided once, and each artifact chunk published about once per request
window, not once per replica. Then the replica holding the engine lease is
SIGKILLed after wave 1 started: the other takes the lease within seconds and
the rollout completes, with the same checks.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from agent.config import load_config
from server.db.leases import lease_holder
from server.db.models import AuditEvent, Deployment, EventRecord, Rollout, TelemetryRecord, Wave
from server.db_location import ENV_DB_URL
from server.lease import TTL_S
from server.rollouts import RolloutPolicy, start_rollout
from server.selection import Selection
from server.setup import Workspace, open_workspace
from shared.topics import PREFIX
from tests.e2e.fleet import QUICK_AGENT_TOML, Fleet, cli, wait_for
from tests.e2e.test_faults import WideModels
from tests.fleet_broker import FleetBroker
from tests.pg import PostgresServer

pytestmark = pytest.mark.e2e

PROFILE = "replicabox"
AGENTS = ("r1", "r2", "r3")
REPLICAS = ("a", "b")
SETTLE_S = 150
# Gates with room for two cores shared by five Python processes and PostgreSQL.
POLICY = RolloutPolicy(waves=("1", "100%"), max_latency_ratio=5.0, max_regression=0.05)


@dataclass
class ChunkWatcher:
    """Every artifact chunk the broker delivered, with when: one subscriber sees what every agent could."""

    config: Path
    seen: list[tuple[str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ChunkWatcher:
        address = load_config(self.config).broker_address()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=address.username or "", protocol=paho.MQTTv5)
        address.configure(self.client)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"{PREFIX}/artifacts/+/chunks/+", qos=1)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port, keepalive=10)
        self.client.loop_start()
        assert subscribed.wait(15), "the chunk watcher could not subscribe"
        return self

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.seen.append((message.topic, time.monotonic()))

    def take(self) -> list[tuple[str, float]]:
        with self.lock:
            seen, self.seen = self.seen, []
        return seen

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Lab:
    fleet: Fleet
    workspace: Workspace
    models: WideModels
    chunks: ChunkWatcher

    def start_replica(self, name: str) -> None:
        self.fleet.start(f"server-{name}", "server", "--data-dir", str(self.fleet.data_dir), "--http", "off",
                         "--replica", name)

    def leader(self) -> str | None:
        """The replica holding the engine lease now (None between a holder's death and the takeover)."""
        with self.workspace.db.session() as session:
            held = lease_holder(session, "engine")
        return held[0].split(":")[0] if held is not None and held[1] > 0 else None

    def rollout(self) -> str:
        ref = self.models.add()
        return start_rollout(self.workspace.db, self.workspace.blobs, self.workspace.keys(), ref,
                             Selection(devices=AGENTS), POLICY)

    def state(self, rollout_id: str) -> str:
        with self.workspace.db.session() as session:
            rollout = session.get(Rollout, rollout_id)
            assert rollout is not None
            return rollout.state

    def wait_settled(self, rollout_id: str) -> str:
        def settled() -> str | None:
            self.fleet.assert_alive()
            state = self.state(rollout_id)
            return state if state != "running" else None

        return str(wait_for(settled, SETTLE_S, f"rollout {rollout_id} to settle", every=0.5))

    def waves_started(self, rollout_id: str) -> int:
        with self.workspace.db.session() as session:
            return len([w for w in session.scalars(select(Wave).where(Wave.rollout_id == rollout_id))
                        if w.state != "waiting"])

    def assert_each_decision_once(self, rollout_id: str) -> None:
        with self.workspace.db.session() as session:
            kinds = Counter(
                (kind, (data or {}).get("wave")) for kind, data in session.execute(
                    select(AuditEvent.kind, AuditEvent.data).where(AuditEvent.rollout_id == rollout_id))
            )
            waves = {w.index: w.state for w in session.scalars(select(Wave).where(Wave.rollout_id == rollout_id))}
            installs = Counter(session.scalars(select(Deployment.device_id).where(
                Deployment.rollout_id == rollout_id, Deployment.kind == "install")))
        assert waves == {0: "passed", 1: "passed"}
        for wave in (0, 1):
            assert kinds[("wave.started", wave)] == 1, kinds
            assert kinds[("wave.passed", wave)] == 1, kinds
        assert kinds[("rollout.succeeded", None)] == 1, kinds
        assert sorted(installs.values()) == [1, 1, 1], f"a device got two directives: {installs}"

    def assert_reports_once_and_none_lost(self) -> None:
        """Per (device, boot) the agent numbers its reports 1, 2, 3...: stored at most once (and every one,
        once the agents' outboxes are empty)."""
        def outboxes_empty() -> bool:
            return not any(next((self.fleet.agent_dirs[name] / "outbox").glob("*.msg"), None) for name in AGENTS)

        wait_for(outboxes_empty, 90, "every agent's reports to be acknowledged", every=1.0)
        by_boot: dict[tuple[str, str], list[int]] = defaultdict(list)
        with self.workspace.db.session() as session:
            for table in (EventRecord, TelemetryRecord):
                for device, boot, seq in session.execute(select(table.device_id, table.boot_id, table.seq)):
                    by_boot[(device, boot)].append(seq)
            doubled = session.execute(
                select(TelemetryRecord.device_id, TelemetryRecord.boot_id, TelemetryRecord.seq, func.count())
                .group_by(TelemetryRecord.device_id, TelemetryRecord.boot_id, TelemetryRecord.seq)
                .having(func.count() > 1)).all()
        assert not doubled
        for key, seqs in by_boot.items():
            assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"{key}: reports lost or doubled: {sorted(seqs)}"

    def assert_chunks_served_once_per_window(self) -> dict[str, int]:
        """Two replicas serving one request would publish the same chunk twice within milliseconds; one
        server publishes a chunk again only in a later window (0.3 s). Returns copies per chunk."""
        seen = self.chunks.take()
        times: dict[str, list[float]] = defaultdict(list)
        for topic, at in seen:
            times[topic].append(at)
        assert times, "no chunk was published"
        for topic, ats in times.items():
            gaps = [b - a for a, b in itertools.pairwise(ats)]
            assert all(gap > 0.15 for gap in gaps), f"{topic} published twice at once (gaps {gaps})"
        return {topic: len(ats) for topic, ats in times.items()}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("replicas")
    postgres = PostgresServer().start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_DB_URL, postgres.create_database())  # every CLI command and replica uses PostgreSQL
        data_dir = root / "server"
        broker = FleetBroker(data_dir)
        cli("init", "--data-dir", str(data_dir), "--release-key", "online", "--broker-host", "127.0.0.1",
            "--broker-listen", broker.listen)
        fleet = Fleet(root, broker.start(), data_dir)
        watcher = None
        try:
            cli("profile", "add", PROFILE, "--quantizations", "float32", "--recipe", "float32", "--data-dir",
                str(data_dir))
            for name in (*AGENTS, "watcher"):
                fleet.register(name, PROFILE, extra_toml=QUICK_AGENT_TOML)
            workspace = open_workspace(data_dir)
            lab = Lab(fleet, workspace, WideModels(root / "models", workspace), ChunkWatcher(fleet.configs["watcher"]))
            for name in REPLICAS:
                lab.start_replica(name)
            for name in AGENTS:
                fleet.start_agent(name)
            fleet.wait_online(*AGENTS)
            watcher = lab.chunks.start()
            yield lab
            workspace.db.close()
        finally:
            if watcher is not None:
                watcher.stop()
            fleet.stop()
            broker.stop()
            postgres.stop()


def test_each_replica_connects_as_its_own_identity_and_one_leads(lab: Lab) -> None:
    def connected(name: str) -> bool:
        return "connected to mqtts://" in lab.fleet.log(f"server-{name}")

    wait_for(lambda: all(connected(name) for name in REPLICAS), 30, "both replicas to connect")
    passwd = (lab.fleet.data_dir / "broker" / "passwd").read_text()
    acl = (lab.fleet.data_dir / "broker" / "acl").read_text()
    for name in REPLICAS:
        assert f"edgefleet-server-{name}:" in passwd and f"user edgefleet-server-{name}\n" in acl
    assert lab.leader() in REPLICAS


def test_a_two_wave_rollout_over_two_replicas_decides_and_stores_everything_once(lab: Lab) -> None:
    rollout_id = lab.rollout()

    assert lab.wait_settled(rollout_id) == "succeeded"

    lab.assert_each_decision_once(rollout_id)
    lab.assert_reports_once_and_none_lost()
    copies = lab.assert_chunks_served_once_per_window()
    # three devices in two waves: at most a copy per device and re-ask, never a copy per replica on top
    assert max(copies.values()) <= 2 * len(AGENTS), copies
    for name in REPLICAS:  # the shared subscription split the reports between them
        assert "server.ingest:" in lab.fleet.log(f"server-{name}"), f"replica {name} stored no report"


def test_killing_the_lease_holder_mid_rollout_hands_the_engine_to_the_other(lab: Lab) -> None:
    rollout_id = lab.rollout()
    wait_for(lambda: lab.waves_started(rollout_id) >= 1, SETTLE_S, "wave 1 to start")
    leader = lab.leader()
    assert leader is not None
    other = next(name for name in REPLICAS if name != leader)

    lab.fleet.kill(f"server-{leader}")
    killed_at = time.monotonic()
    wait_for(lambda: lab.leader() == other, 3 * TTL_S, f"replica {other} to take the engine lease")
    took_s = time.monotonic() - killed_at

    assert lab.wait_settled(rollout_id) == "succeeded"
    assert took_s <= TTL_S + 2, took_s
    lab.assert_each_decision_once(rollout_id)
    lab.assert_reports_once_and_none_lost()
    lab.assert_chunks_served_once_per_window()
    lab.start_replica(leader)  # back, as a follower
