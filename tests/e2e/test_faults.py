"""Faults injected into real processes: agents, the server and the broker killed at every step.

One private Mosquitto (persistent, as shipped), the server and two agent
processes, all started through the CLI. A failpoint (``shared.failpoints``)
makes the agent SIGKILL itself at a precise moment of an install; the test
restarts it, with the broker up or down for a while, and checks that the
install ends as the state table says, that the active model is whole and
verified, that the agent is alive, and that every report it made reached the
server's database (and, by the database's unique key, at most once).

The model is a wide digits classifier kept in float32 (a profile whose only
recipe is float32), about 600 KB, so it travels as three 256 KiB chunks and
a kill can land between two of them. Every rollout ships a new version (a
small bias change), so each install really downloads.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from agent.download import verify_file
from agent.slots import SlotStore
from server.broker import Mosquitto
from server.catalog import add_model
from server.compress.digits import digits_split
from server.compress.evalset import write_eval_file
from server.db.models import Deployment, Device, EventRecord, TelemetryRecord
from server.rollouts import RolloutPolicy, start_rollout
from server.selection import Selection
from server.setup import Workspace, open_workspace
from shared.messages import DeviceState, decode_payload
from shared.topics import TopicKind, device_topic
from tests.e2e.fleet import QUICK_AGENT_TOML, Fleet, cli, wait_for

pytestmark = pytest.mark.e2e

PROFILE = "crashbox"
SETTLE_S = 120  # generous: two cores, TensorFlow in the test process, three Python processes
OUTAGE_S = 3.0  # how long the broker stays away while the restarted agent resumes

QUICK_AGENT = QUICK_AGENT_TOML
# A trial that lasts long enough to do things to the world while it runs.
SLOW_TRIAL_S = 8.0
SLOW_AGENT = QUICK_AGENT.replace("min_seconds = 0.3", f"min_seconds = {SLOW_TRIAL_S}")


class WideModels:
    """New versions of one wide digits classifier, each with different bytes and the same accuracy."""

    def __init__(self, directory: Path, workspace: Workspace) -> None:
        from server.compress.convert import import_keras

        keras = import_keras()
        keras.utils.set_random_seed(0)
        train, test = digits_split()
        self.model = keras.Sequential([
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(2048, activation="relu"),  # 64 x 2048 float32 weights: 512 KiB
            keras.layers.Dense(10, activation="softmax"),
        ])
        self.model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        self.model.fit(train.x, train.y, epochs=3, batch_size=64, verbose=0)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.eval_path = write_eval_file(test, directory / "eval.npz")
        self.workspace = workspace
        self.count = 0

    def add(self) -> str:
        """Register the next version; returns its reference, e.g. ``wide:3``."""
        self.count += 1
        kernel, bias = self.model.layers[-1].get_weights()
        self.model.layers[-1].set_weights([kernel, bias + np.float32(1e-4)])
        path = self.directory / f"wide-{self.count}.keras"
        self.model.save(path)
        info = add_model(self.workspace.db, self.workspace.blobs, "wide", path, self.eval_path)
        return f"{info.model}:{info.version}"


@dataclass
class Lab:
    fleet: Fleet
    workspace: Workspace
    models: WideModels

    def device_id(self, name: str) -> str:
        with self.workspace.db.session() as session:
            device = session.scalar(select(Device).where(Device.name == name))
            assert device is not None
            return device.id

    def boot_id(self, name: str) -> str | None:
        device_id = self.device_id(name)
        with self.workspace.db.session() as session:
            device = session.get(Device, device_id)
            return device.boot_id if device is not None else None

    def restart_agent(self, name: str, *, failpoints: str | None = None) -> None:
        """Stop the agent politely and start it again; returns once the server saw the new boot."""
        before = self.boot_id(name)
        if name in self.fleet.processes:
            self.fleet.stop_process(name)
        self.fleet.start_agent(name, failpoints=failpoints)
        wait_for(lambda: self.boot_id(name) != before, SETTLE_S, f"{name} to say hello")

    def rollout(self, *names: str) -> dict[str, str]:
        """Roll a new version out to ``names``; returns each device's deployment id."""
        ref = self.models.add()
        rollout_id = start_rollout(
            self.workspace.db, self.workspace.blobs, self.workspace.keys(), ref, Selection(devices=names),
            RolloutPolicy(waves=("100%",)),
        )
        ids: dict[str, str] = {}

        def deployed() -> bool:  # the running server's engine creates them on its next tick
            with self.workspace.db.session() as session:
                rows = session.scalars(select(Deployment).where(Deployment.rollout_id == rollout_id)).all()
                ids.update({d.device_id: d.id for d in rows})
            return len(ids) == len(names)

        wait_for(deployed, SETTLE_S, f"the server to deploy {rollout_id}")
        return {name: ids[self.device_id(name)] for name in names}

    def deployment(self, deployment_id: str) -> tuple[str, str]:
        with self.workspace.db.session() as session:
            row = session.get(Deployment, deployment_id)
            assert row is not None
            return row.state, row.reason

    def wait_final(self, deployment_id: str, timeout: float = SETTLE_S) -> tuple[str, str]:
        def final() -> tuple[str, str] | None:
            self.fleet.assert_alive()
            state, reason = self.deployment(deployment_id)
            return (state, reason) if state in ("committed", "rolled_back", "failed") else None

        return wait_for(final, timeout, f"deployment {deployment_id} to settle", every=0.3)

    def wait_state(self, deployment_id: str, state: str) -> None:
        wait_for(lambda: self.deployment(deployment_id)[0] == state, SETTLE_S, f"{deployment_id} to reach {state}")

    def reports(self, name: str) -> dict[str, list[int]]:
        """Every report (event or telemetry) the server stored for a device: sequence numbers per boot."""
        device_id = self.device_id(name)
        by_boot: dict[str, list[int]] = {}
        with self.workspace.db.session() as session:
            for table in (EventRecord, TelemetryRecord):
                for boot, seq in session.execute(select(table.boot_id, table.seq).where(table.device_id == device_id)):
                    by_boot.setdefault(boot, []).append(seq)
        return {boot: sorted(seqs) for boot, seqs in by_boot.items()}

    def events(self, deployment_id: str) -> list[str]:
        with self.workspace.db.session() as session:
            rows = session.scalars(
                select(EventRecord.state).where(EventRecord.deployment_id == deployment_id).order_by(EventRecord.id)
            )
            return list(rows)

    def trials(self, deployment_id: str) -> int:
        with self.workspace.db.session() as session:
            rows = session.scalars(select(TelemetryRecord.id).where(TelemetryRecord.deployment_id == deployment_id))
            return len(list(rows))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, fleet_init_args: tuple[str, ...]) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("faults")
    fleet = Fleet(root, Mosquitto(root / "broker").start(), root / "server")
    try:
        cli("init", "--data-dir", str(fleet.data_dir), "--release-key", "online", *fleet_init_args)
        cli("profile", "add", PROFILE, "--quantizations", "float32", "--recipe", "float32", "--data-dir",
            str(fleet.data_dir))
        fleet.register("crashy", PROFILE, extra_toml=QUICK_AGENT)
        fleet.register("slowpoke", PROFILE, extra_toml=SLOW_AGENT)
        fleet.start_server()
        for name in ("crashy", "slowpoke"):
            fleet.start_agent(name)
        fleet.wait_online("crashy", "slowpoke")
        workspace = open_workspace(fleet.data_dir)
        lab = Lab(fleet, workspace, WideModels(root / "models", workspace))
        # A first model everywhere, so every later install has a previous one to keep or replace.
        for deployment in lab.rollout("crashy", "slowpoke").values():
            assert lab.wait_final(deployment)[0] == "committed"
        yield lab
        workspace.db.close()
    finally:
        fleet.stop()
        fleet.broker.stop()


# -- what the agent left behind ------------------------------------------------------------


def outbox_reports(agent_dir: Path) -> set[tuple[str, int]]:
    """(boot_id, seq) of every report still in the agent's outbox: not acknowledged yet."""
    found = set()
    for path in (agent_dir / "outbox").glob("*.msg"):
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue  # acknowledged and deleted by the running agent since the listing: no longer waiting
        body = json.loads(json.loads(text)["payload"])
        found.add((body["boot_id"], body["seq"]))
    return found


def agent_record(agent_dir: Path) -> dict[str, Any]:
    return json.loads((agent_dir / "update-record.json").read_text())


def assert_whole_verified_model(agent_dir: Path) -> str:
    """The active slot holds a complete model whose bytes match its signed manifest; returns its deployment."""
    slots = SlotStore(agent_dir)
    slot, manifest, deployment = slots.active_slot(), slots.active_manifest(), slots.active_deployment()
    assert slot is not None and manifest is not None and deployment is not None
    for entry in manifest.files:
        verify_file(slots.file_path(slot, entry), entry)
    return deployment


def assert_every_report_stored(lab: Lab, name: str, undelivered: set[tuple[str, int]]) -> None:
    """Per boot, the agent numbers its reports 1, 2, 3...: a gap is a lost report. What the killed
    agent had not delivered yet must have arrived too (its outbox survives it)."""
    reports = lab.reports(name)
    for boot, seqs in reports.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"boot {boot}: reports lost or doubled: {seqs}"
    stored = {(boot, seq) for boot, seqs in reports.items() for seq in seqs}
    assert undelivered <= stored, f"undelivered at the kill, never stored: {sorted(undelivered - stored)}"


# -- the crash matrix ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CrashCase:
    state: str
    failpoint: str
    expected: str  # the deployment's final state after the restart

    @property
    def id(self) -> str:
        return f"{self.state}@{self.failpoint.split('=')[0].removeprefix('agent.')}"


# Two moments in each install state: just after the state is saved (before its work), and
# in the middle of its work. A crash during the trial means the model may have killed the
# agent, so it rolls back; every other state resumes and commits.
CRASH_CASES = [
    CrashCase("downloading", "agent.saved.downloading=kill", "committed"),
    CrashCase("downloading", "agent.chunk.stored=kill@2", "committed"),
    CrashCase("verifying", "agent.saved.verifying=kill", "committed"),
    CrashCase("verifying", "agent.verified.file=kill", "committed"),
    CrashCase("staged", "agent.saved.staged=kill", "committed"),
    CrashCase("staged", "agent.staged.files_moved=kill", "committed"),
    CrashCase("trial", "agent.saved.trial=kill", "rolled_back"),
    CrashCase("trial", "agent.trial.started=kill+200ms", "rolled_back"),
    CrashCase("committed", "agent.saved.committed=kill", "committed"),
    CrashCase("committed", "agent.committed.switched=kill", "committed"),
]


@pytest.mark.parametrize("broker_down", [False, True], ids=["broker-up", "broker-down"])
@pytest.mark.parametrize("case", CRASH_CASES, ids=lambda c: c.id)
def test_an_agent_killed_in_any_install_state_recovers_and_loses_no_report(
    lab: Lab, case: CrashCase, broker_down: bool
) -> None:
    fleet, agent_dir = lab.fleet, lab.fleet.agent_dirs["crashy"]
    lab.restart_agent("crashy", failpoints=case.failpoint)
    before = assert_whole_verified_model(agent_dir)

    deployment = lab.rollout("crashy")["crashy"]

    assert fleet.wait_killed("crashy") == -signal.SIGKILL, fleet.log("crashy")[-3000:]
    assert agent_record(agent_dir)["state"] == case.state  # killed in the state this case is about
    undelivered = outbox_reports(agent_dir)
    if broker_down:
        fleet.broker.stop()
        fleet.start_agent("crashy")  # resumes with nobody to talk to
        time.sleep(OUTAGE_S)
        fleet.assert_alive("crashy")
        fleet.restart_broker()
    else:
        fleet.start_agent("crashy")

    state, reason = lab.wait_final(deployment)
    assert state == case.expected, reason
    if case.expected == "rolled_back":
        assert reason == "agent restarted during trial"
    wait_for(lambda: agent_record(agent_dir)["state"] == "idle", SETTLE_S, "the agent to be idle")
    wait_for(lambda: not outbox_reports(agent_dir), SETTLE_S, "the agent's outbox to empty")
    fleet.assert_alive("crashy", "server")
    active = assert_whole_verified_model(agent_dir)
    assert active == (deployment if case.expected == "committed" else before)
    assert_every_report_stored(lab, "crashy", undelivered)
    assert lab.events(deployment)[-1] == case.expected


# -- the broker, the server, and a trial that takes its time ------------------------------------


def test_the_broker_killed_during_a_trial_costs_nothing(lab: Lab) -> None:
    fleet, agent_dir = lab.fleet, lab.fleet.agent_dirs["slowpoke"]
    deployment = lab.rollout("slowpoke")["slowpoke"]
    lab.wait_state(deployment, "trial")

    fleet.broker.kill()  # SIGKILL: whatever it had not saved is gone
    wait_for(lambda: agent_record(agent_dir).get("outcome") == "committed", SETTLE_S,
             "the trial to end while the broker is away")
    fleet.assert_alive("slowpoke", "server")
    assert outbox_reports(agent_dir), "the results should be waiting in the outbox"
    undelivered = outbox_reports(agent_dir)
    fleet.restart_broker()

    assert lab.wait_final(deployment) == ("committed", "")
    wait_for(lambda: lab.trials(deployment) == 1, SETTLE_S, "the trial's numbers to arrive")
    wait_for(lambda: not outbox_reports(agent_dir), SETTLE_S, "the agent's outbox to empty")
    assert_every_report_stored(lab, "slowpoke", undelivered)
    assert assert_whole_verified_model(agent_dir) == deployment
    fleet.assert_alive()


@pytest.mark.parametrize("lose_queue", [False, True], ids=["queue-kept", "queue-lost"])
def test_a_server_down_while_the_agent_finishes_settles_the_deployment_on_restart(lab: Lab, lose_queue: bool) -> None:
    """Killed before the agent reports; restarted after. With its persistent session the broker kept the
    reports for it. With that queue lost too (the broker died and came back without its data), the
    device's hello settles the deployment at once, and the agent sends its reports again, because no
    server acknowledged them."""
    fleet, agent_dir = lab.fleet, lab.fleet.agent_dirs["slowpoke"]
    agent_log, server_log = len(fleet.log("slowpoke")), len(fleet.log("server"))
    deployment = lab.rollout("slowpoke")["slowpoke"]
    lab.wait_state(deployment, "trial")

    fleet.kill("server")
    wait_for(lambda: agent_record(agent_dir).get("outcome") == "committed", SETTLE_S, "the agent to finish")
    assert lab.deployment(deployment)[0] == "trial"  # nobody told the database yet
    if lose_queue:
        fleet.broker.kill()
        (fleet.broker.workdir / "mosquitto.db").unlink(missing_ok=True)
        fleet.restart_broker()
    restarted = time.monotonic()
    fleet.start_server()

    assert lab.wait_final(deployment, timeout=60) == ("committed", "")
    took = time.monotonic() - restarted
    assert took < 30, f"settled only {took:.1f} s after the server restarted"
    wait_for(lambda: lab.trials(deployment) == 1, SETTLE_S, "the trial's numbers")
    wait_for(lambda: not outbox_reports(agent_dir), SETTLE_S, "the agent's outbox to empty")
    assert lab.events(deployment) == ["downloading", "verifying", "staged", "trial", "committed"]
    settled_from_state = f"deployment {deployment} settled from the device's state" in fleet.log("server")[server_log:]
    resent = "no acknowledgement for a report" in fleet.log("slowpoke")[agent_log:]
    # Kept: the broker's queue alone brought every report, before the retained state could settle it.
    # Lost: the hello settled it, and the agent sent its reports again for want of an acknowledgement.
    # (SQLite only: on PostgreSQL the server runs as a replica, whose short broker session keeps no queue
    # for long; tests/e2e/test_replicas.py kills one there.)
    assert (settled_from_state, resent) == ((True, True) if lose_queue else (False, False))
    assert_every_report_stored(lab, "slowpoke", set())
    fleet.assert_alive()


@pytest.mark.both_backends  # also on PostgreSQL
@pytest.mark.parametrize("point", ["server.applied.events", "server.committed.events"],
                         ids=["before-commit", "before-ack"])
def test_a_server_killed_between_applying_and_acknowledging_loses_and_doubles_nothing(lab: Lab, point: str) -> None:
    """Reports are acknowledged to the broker only after the batch that stored them committed."""
    fleet = lab.fleet
    fleet.stop_process("server")
    fleet.start("server", "server", "--data-dir", str(fleet.data_dir), "--broker", fleet.broker.url, "--http", "off",
                failpoints=f"{point}=kill")
    agent_log = len(fleet.log("crashy"))
    deployment = lab.rollout("crashy")["crashy"]

    assert fleet.wait_killed("server") == -signal.SIGKILL
    fleet.start_server()

    assert lab.wait_final(deployment) == ("committed", "")
    wait_for(lambda: lab.events(deployment)[-1:] == ["committed"], SETTLE_S, "the final event")
    wait_for(lambda: not outbox_reports(lab.fleet.agent_dirs["crashy"]), SETTLE_S, "the agent's outbox to empty")
    assert lab.events(deployment) == ["downloading", "verifying", "staged", "trial", "committed"]
    assert_every_report_stored(lab, "crashy", set())
    # The broker delivered again what the dead server had not acknowledged: the agent never had to.
    assert "no acknowledgement for a report" not in fleet.log("crashy")[agent_log:]
    fleet.assert_alive()


# -- the loop stays responsive -------------------------------------------------------------------


def test_the_agent_answers_a_ping_within_a_second_while_a_trial_runs(lab: Lab) -> None:
    fleet = lab.fleet
    device = lab.device_id("slowpoke")
    states: list[tuple[float, DeviceState]] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="e2e-pinger", protocol=paho.MQTTv5)
    client.on_message = lambda c, u, m: states.append(
        (time.monotonic(), decode_payload(TopicKind.STATE, bytes(m.payload)))
    )
    client.connect("127.0.0.1", fleet.broker.port)
    client.subscribe(device_topic(TopicKind.STATE, device), qos=1)
    client.loop_start()
    try:
        deployment = lab.rollout("slowpoke")["slowpoke"]
        wait_for(lambda: any(s.update_state == "trial" for _, s in states), SETTLE_S, "the trial to start")
        time.sleep(1.0)  # well into a trial of SLOW_TRIAL_S seconds
        seen = len(states)
        sent = time.monotonic()
        client.publish(device_topic(TopicKind.CMD, device), b'{"v":1,"name":"ping","args":{}}', qos=1)
        answered, reply = wait_for(lambda: states[seen] if len(states) > seen else None, 30, "the ping's answer")
    finally:
        client.loop_stop()
        client.disconnect()
    assert reply.update_state == "trial"  # answered while the trial still ran
    assert answered - sent < 1.0, f"answered after {answered - sent:.2f} s"
    assert lab.wait_final(deployment) == ("committed", "")
