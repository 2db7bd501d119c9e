"""Waves, gates, failure policies and live selection, driven through the real engine with a fake clock.

Devices report through ``server.ingest`` exactly as the server applies MQTT reports; the engine's
``tick(now)`` returns what it would publish.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, selectinload

from server.db.models import AuditEvent, Deployment, Device, Rollout, Wave
from server.devices import register_device
from server.ingest import apply_event, apply_state, apply_telemetry
from server.rollouts import (
    Outgoing,
    RolloutEngine,
    RolloutPolicy,
    abort_rollout,
    pause_rollout,
    resume_rollout,
    rollback_rollout,
    rollout_status,
    start_rollout,
)
from server.rollouts.policy import OnFailure
from server.rollouts.read_model import status_json
from server.selection import Selection
from server.setup import Workspace
from shared import PROTOCOL_VERSION
from shared.errors import UserInputError
from shared.messages import ActiveModel, BenchmarkResult, DeviceState, Event, PreviousModel, Telemetry
from shared.topics import TopicKind, device_topic

NAMES = ("cam-1", "cam-2", "cam-3", "cam-4", "cam-5")


def bench(p95: float) -> BenchmarkResult:
    return BenchmarkResult(runtime="ai_edge_litert", threads=1, init_ms=1.0, first_ms=1.0, warmup_runs=1, runs=10,
                           mean_ms=p95 / 2, std_ms=0.1, min_ms=p95 / 3, max_ms=p95, p50_ms=p95 / 2, p90_ms=p95,
                           p95_ms=p95, p99_ms=p95, peak_rss_bytes=1 << 20)


@dataclass
class Fleet:
    """A workspace, its devices and an engine with a fake clock."""

    workspace: Workspace
    ids: dict[str, str]
    now: float = field(default_factory=time.time)
    seq: int = 0
    sent: list[Outgoing] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine = RolloutEngine(self.workspace.db, self.workspace.keys(), blobs=self.workspace.blobs)

    def tick(self, seconds: float = 1.0) -> list[Outgoing]:
        self.now += seconds
        sent = self.engine.tick(self.now)
        self.sent += sent
        return sent

    def start(self, *, waves: str = "1,100%", names: tuple[str, ...] = NAMES, **policy: object) -> str:
        from server.rollouts import parse_waves

        rollout_id = start_rollout(self.workspace.db, self.workspace.blobs, self.workspace.keys(), "digits",
                                   Selection(devices=names), RolloutPolicy(waves=parse_waves(waves), **policy))
        self.tick()
        return rollout_id

    def deployments(self, rollout_id: str, kind: str = "install") -> dict[str, Deployment]:
        """{device name: its latest deployment of this kind in the rollout}."""
        with self.workspace.db.session() as session:
            rows = session.scalars(
                select(Deployment).where(Deployment.rollout_id == rollout_id, Deployment.kind == kind)
                .options(selectinload(Deployment.release), selectinload(Deployment.previous_release))
                .order_by(Deployment.seq)).all()
            names = {v: k for k, v in self.ids.items()}
            return {names[d.device_id]: d for d in rows}

    def report(self, name: str, deployment_id: str, state: str, reason: str = "") -> None:
        self.seq += 1
        with self.workspace.db.session() as session:
            apply_event(session, Event(v=PROTOCOL_VERSION, device_id=self.ids[name], boot_id="b", seq=self.seq,
                                       deployment_id=deployment_id, state=state, reason=reason, ts=self.now))

    def trial(self, name: str, deployment_id: str, accuracy: float, p95: float,
              previous: tuple[float, float] | None = None) -> None:
        self.seq += 1
        before = None if previous is None else PreviousModel("digits", 1, "0" * 64, previous[0], previous[1] / 2,
                                                                  previous[1])
        with self.workspace.db.session() as session:
            apply_telemetry(session, Telemetry(v=PROTOCOL_VERSION, device_id=self.ids[name], boot_id="b",
                                               seq=self.seq, deployment_id=deployment_id, kind="trial", ts=self.now,
                                               benchmark=bench(p95), accuracy=accuracy, samples=100,
                                               previous=before))

    def state(self, name: str, *, active: Deployment | None, seq: int, hello: bool = False) -> None:
        with self.workspace.db.session() as session:
            model = None if active is None else ActiveModel("digits", 1, "0" * 64, "dynamic_range", active.id)
            device = apply_state(session, DeviceState(
                v=PROTOCOL_VERSION, device_id=self.ids[name], boot_id="b", runtime="ai_edge_litert",
                runtime_version="2.3.0", update_state="idle", deployment_id=None, directive_seq=seq, active=model,
                hello=hello))
            if hello and device is not None:  # as the server's state handler does
                self.engine.on_hello(session, device, seq)

    def commit(self, name: str, deployment: Deployment, accuracy: float = 0.97, p95: float = 1.0,
               previous: tuple[float, float] | None = None) -> None:
        """The device installs it: trial numbers, committed, and its state names the new active model."""
        self.trial(name, deployment.id, accuracy, p95, previous)
        self.report(name, deployment.id, "committed")
        self.state(name, active=deployment, seq=deployment.seq)

    def rollout(self, rollout_id: str) -> tuple[str, list[str]]:
        with self.workspace.db.session() as session:
            rollout = session.get(Rollout, rollout_id)
            assert rollout is not None
            return rollout.state, [w.state for w in rollout.waves]

    def audit(self, rollout_id: str) -> list[str]:
        with self.workspace.db.session() as session:
            return list(session.scalars(select(AuditEvent.kind).where(AuditEvent.rollout_id == rollout_id)
                                        .order_by(AuditEvent.id)))


@pytest.fixture
def fleet(workspace: Workspace) -> Fleet:
    ids = {name: register_device(workspace.db, name, "x86-64").id for name in NAMES}
    with workspace.db.session() as session:  # all online, so the canary is cam-1 (online first, then by name)
        for device in session.scalars(select(Device)):
            device.online = True
    return Fleet(workspace, ids)


def installed(fleet: Fleet) -> dict[str, Deployment]:
    """A first rollout committed everywhere: every device then has a previous model."""
    first = fleet.start(waves="100%")
    deployments = fleet.deployments(first)
    for name, deployment in deployments.items():
        fleet.commit(name, deployment)
    fleet.tick()
    assert fleet.rollout(first)[0] == "succeeded"
    return deployments


# -- waves --------------------------------------------------------------------------------------------------------


def test_only_the_canary_is_sent_until_its_wave_passes_then_the_rest(fleet: Fleet) -> None:
    rollout_id = fleet.start(waves="1,100%")

    assert list(fleet.deployments(rollout_id)) == ["cam-1"]
    assert [m.topic for m in fleet.sent] == [device_topic(TopicKind.DESIRED, fleet.ids["cam-1"])]
    fleet.tick(60)
    assert list(fleet.deployments(rollout_id)) == ["cam-1"]  # waiting for its report, not a timer

    fleet.commit("cam-1", fleet.deployments(rollout_id)["cam-1"])
    fleet.tick()

    assert sorted(fleet.deployments(rollout_id)) == sorted(NAMES)
    assert fleet.rollout(rollout_id) == ("running", ["passed", "running"])
    for name, deployment in fleet.deployments(rollout_id).items():
        if name != "cam-1":
            fleet.commit(name, deployment)
    fleet.tick()
    assert fleet.rollout(rollout_id) == ("succeeded", ["passed", "passed"])
    assert fleet.audit(rollout_id) == ["rollout.started", "wave.started", "wave.passed", "wave.started",
                                       "wave.passed", "rollout.succeeded"]


def test_wave_sizes_are_cumulative_shares_of_the_selection(fleet: Fleet) -> None:
    rollout_id = fleet.start(waves="1,40%,100%")
    sizes = []
    for _ in range(3):
        deployments = fleet.deployments(rollout_id)
        sizes.append(len(deployments))
        for name, deployment in deployments.items():
            if deployment.state == "pending":
                fleet.commit(name, deployment)
        fleet.tick()
    assert sizes == [1, 2, 5]
    with fleet.workspace.db.session() as session:
        assert [w.target_count for w in session.scalars(select(Wave).where(Wave.rollout_id == rollout_id)
                                                        .order_by(Wave.index))] == [1, 2, 5]
    assert fleet.rollout(rollout_id)[0] == "succeeded"


# -- gates and failure policies -----------------------------------------------------------------------------------


def test_a_regression_below_the_replaced_model_rolls_the_canary_back_and_nobody_else_is_sent_it(
    fleet: Fleet,
) -> None:
    first = installed(fleet)
    rollout_id = fleet.start(waves="1,100%")
    canary = fleet.deployments(rollout_id)["cam-1"]
    assert canary.previous_release_id == first["cam-1"].release_id

    # the device refuses it itself (0.90 is 0.07 below its committed model's 0.97) and says why
    fleet.trial("cam-1", canary.id, 0.90, 1.0, previous=(0.97, 1.0))
    fleet.report("cam-1", canary.id, "rolled_back", "accuracy 0.9000 is 0.0700 below the replaced model's 0.9700")
    fleet.tick()

    assert fleet.rollout(rollout_id) == ("rolled_back", ["failed", "cancelled"])
    assert list(fleet.deployments(rollout_id)) == ["cam-1"]
    assert fleet.deployments(rollout_id, "revert") == {}  # the canary never committed it: nothing to revert
    status = status_json(rollout_status(fleet.workspace.db, rollout_id))
    gates = {g["name"]: g for g in status["waves"][0]["gates"]}
    assert gates["regression"]["measured"] == pytest.approx(0.07) and not gates["regression"]["passed"]
    assert gates["failure_ratio"]["measured"] == 1.0 and not gates["failure_ratio"]["passed"]
    assert status["devices"][0]["previous_accuracy"] == 0.97


def test_a_latency_ratio_over_the_limit_fails_the_wave_even_if_the_device_committed(fleet: Fleet) -> None:
    installed(fleet)
    rollout_id = fleet.start(waves="1,100%", max_latency_ratio=1.5)
    canary = fleet.deployments(rollout_id)["cam-1"]

    fleet.commit("cam-1", canary, p95=1.6, previous=(0.97, 1.0))  # an old agent that did not check
    fleet.tick()

    assert fleet.rollout(rollout_id)[0] == "rolled_back"
    [revert] = fleet.deployments(rollout_id, "revert").values()
    assert (revert.reverts_id, revert.seq) == (canary.id, canary.seq + 1)
    assert revert.release.model_sha256 == canary.previous_release.model_sha256
    assert revert.release_id > canary.release_id  # re-signed: a higher release counter
    assert "rollback.sent" in fleet.audit(rollout_id)


def test_a_latency_ratio_exactly_at_the_limit_passes(fleet: Fleet) -> None:
    installed(fleet)
    rollout_id = fleet.start(waves="1,100%", max_latency_ratio=1.5)

    fleet.commit("cam-1", fleet.deployments(rollout_id)["cam-1"], p95=1.5, previous=(0.97, 1.0))
    fleet.tick()

    assert fleet.rollout(rollout_id) == ("running", ["passed", "running"])


def test_pause_on_failure_holds_later_waves_until_resumed(fleet: Fleet) -> None:
    rollout_id = fleet.start(waves="1,100%", on_failure=OnFailure.PAUSE)
    canary = fleet.deployments(rollout_id)["cam-1"]
    fleet.report("cam-1", canary.id, "failed", "download stalled")
    fleet.tick()
    assert fleet.rollout(rollout_id) == ("paused", ["failed", "waiting"])
    fleet.tick(3600)
    assert list(fleet.deployments(rollout_id)) == ["cam-1"]

    resume_rollout(fleet.workspace.db, rollout_id, "operator test@host")
    fleet.tick()

    assert fleet.rollout(rollout_id) == ("running", ["overridden", "running"])
    assert len(fleet.deployments(rollout_id)) == len(NAMES)
    assert {"wave.overridden", "rollout.paused", "rollout.running"} <= set(fleet.audit(rollout_id))


def test_an_operator_pause_holds_the_next_wave_and_resume_releases_it(fleet: Fleet) -> None:
    rollout_id = fleet.start(waves="1,100%")
    pause_rollout(fleet.workspace.db, rollout_id, "operator test@host")
    fleet.commit("cam-1", fleet.deployments(rollout_id)["cam-1"])
    fleet.tick()
    assert fleet.rollout(rollout_id) == ("paused", ["passed", "waiting"])
    with pytest.raises(UserInputError, match="cannot be paused"):
        pause_rollout(fleet.workspace.db, rollout_id, "operator test@host")

    resume_rollout(fleet.workspace.db, rollout_id, "operator test@host")
    fleet.tick()
    assert len(fleet.deployments(rollout_id)) == len(NAMES)


def test_an_operator_rollback_reverts_committed_devices_and_withdraws_pending_ones(fleet: Fleet) -> None:
    first = installed(fleet)
    rollout_id = fleet.start(waves="1,100%")
    fleet.commit("cam-1", fleet.deployments(rollout_id)["cam-1"], previous=(0.97, 1.0))
    fleet.tick()
    deployments = fleet.deployments(rollout_id)
    fleet.commit("cam-2", deployments["cam-2"], previous=(0.97, 1.0))
    fleet.report("cam-3", deployments["cam-3"].id, "downloading")
    fleet.sent.clear()

    rollback_rollout(fleet.workspace.db, rollout_id, "operator test@host")
    fleet.tick()

    after = fleet.deployments(rollout_id)
    reverts = fleet.deployments(rollout_id, "revert")
    # committed: sent back; under way: withdrawn and sent back (a newer directive stops the download);
    # never started: withdrawn, their retained desired state cleared
    assert sorted(reverts) == ["cam-1", "cam-2", "cam-3"]
    assert {after[n].state for n in ("cam-3", "cam-4", "cam-5")} == {"cancelled"}
    for name, revert in reverts.items():
        assert revert.release.model_sha256 == first[name].release.model_sha256
    cleared = {m.topic for m in fleet.sent if m.payload == b""}
    assert cleared == {device_topic(TopicKind.DESIRED, fleet.ids[n]) for n in ("cam-4", "cam-5")}
    # a device that comes back and says hello is not sent the withdrawn version again
    fleet.state("cam-4", active=first["cam-4"], seq=first["cam-4"].seq, hello=True)
    fleet.sent.clear()
    fleet.tick()
    assert fleet.sent == []


def test_abort_withdraws_what_was_not_started_and_keeps_what_was_installed(fleet: Fleet) -> None:
    installed(fleet)
    rollout_id = fleet.start(waves="1,100%")
    fleet.commit("cam-1", fleet.deployments(rollout_id)["cam-1"], previous=(0.97, 1.0))
    fleet.tick()

    abort_rollout(fleet.workspace.db, rollout_id, "operator test@host")
    fleet.tick()

    after = fleet.deployments(rollout_id)
    assert after["cam-1"].state == "committed"
    assert {after[n].state for n in NAMES[1:]} == {"cancelled"}
    assert fleet.deployments(rollout_id, "revert") == {}
    assert fleet.rollout(rollout_id) == ("aborted", ["passed", "cancelled"])
    with pytest.raises(UserInputError, match="cannot be resumed"):
        resume_rollout(fleet.workspace.db, rollout_id, "operator test@host")


# -- timeouts and live selection ----------------------------------------------------------------------------------


def test_a_device_that_never_reports_fails_its_wave_after_the_timeout(fleet: Fleet) -> None:
    rollout_id = fleet.start(waves="100%", report_timeout_s=300)
    for name in NAMES[1:]:
        fleet.commit(name, fleet.deployments(rollout_id)[name])
    fleet.tick(200)
    assert fleet.rollout(rollout_id)[0] == "running"

    fleet.tick(200)

    assert fleet.rollout(rollout_id)[0] == "rolled_back"
    assert "device.timed_out" in fleet.audit(rollout_id)


def test_with_a_failure_budget_a_timed_out_device_does_not_hold_the_rollout_and_is_updated_when_it_returns(
    fleet: Fleet,
) -> None:
    rollout_id = fleet.start(waves="100%", report_timeout_s=300, max_failure_ratio=0.2)
    for name in NAMES[1:]:
        fleet.commit(name, fleet.deployments(rollout_id)[name])
    fleet.tick(400)
    assert fleet.rollout(rollout_id)[0] == "succeeded"

    late = fleet.deployments(rollout_id)["cam-1"]
    fleet.state("cam-1", active=None, seq=0, hello=True)  # back online, still on nothing
    fleet.sent.clear()
    fleet.tick()
    assert [m.topic for m in fleet.sent] == [device_topic(TopicKind.DESIRED, fleet.ids["cam-1"])]
    fleet.commit("cam-1", late)
    assert fleet.deployments(rollout_id)["cam-1"].state == "committed"


def test_a_device_registered_into_the_selection_later_converges(fleet: Fleet) -> None:
    rollout_id = start_rollout(fleet.workspace.db, fleet.workspace.blobs, fleet.workspace.keys(), "digits",
                               Selection(profiles=("x86-64",)), RolloutPolicy(waves=("100%",)))
    fleet.tick()
    for name, deployment in fleet.deployments(rollout_id).items():
        fleet.commit(name, deployment)
    fleet.tick()
    assert fleet.rollout(rollout_id)[0] == "succeeded"

    fleet.ids["cam-6"] = register_device(fleet.workspace.db, "cam-6", "x86-64").id
    fleet.tick()

    assert "cam-6" in fleet.deployments(rollout_id)
    assert "device.joined" in fleet.audit(rollout_id)


def test_a_device_reset_to_a_blank_slot_is_sent_the_version_again(fleet: Fleet) -> None:
    deployments = installed(fleet)
    rollout_id = deployments["cam-1"].rollout_id

    fleet.state("cam-2", active=None, seq=0, hello=True)  # its data directory was wiped
    fleet.tick()

    again = fleet.deployments(rollout_id)["cam-2"]
    assert again.id != deployments["cam-2"].id and again.seq > deployments["cam-2"].seq
    assert "device.reset" in fleet.audit(rollout_id)
    fleet.tick()
    assert fleet.deployments(rollout_id)["cam-2"].id == again.id  # once


def test_a_state_from_before_the_commit_applied_late_is_no_reset(fleet: Fleet) -> None:
    """Replicas: a device's events (via one replica) can commit its deployment before its older states (via the
    leader) are applied. A blank, idle state without a hello after the commit is such a late one, not a reset."""
    deployments = installed(fleet)
    rollout_id = deployments["cam-1"].rollout_id

    fleet.state("cam-2", active=None, seq=0)  # what it said before it took the directive, applied only now
    fleet.tick()

    assert fleet.deployments(rollout_id)["cam-2"].id == deployments["cam-2"].id
    assert "device.reset" not in fleet.audit(rollout_id)


def test_status_json_keeps_the_old_keys_and_adds_waves_and_previous_numbers(fleet: Fleet) -> None:
    rollout_id = fleet.start(waves="1,100%")

    status = status_json(rollout_status(fleet.workspace.db, rollout_id))

    assert {"rollout", "model", "version", "state", "devices", "waves"} <= set(status)
    assert [w["index"] for w in status["waves"]] == [0, 1]
    assert {"index", "target_count", "state", "gates"} <= set(status["waves"][0])
    device_keys = {"device", "profile", "state", "quantization", "size_bytes", "p50_ms", "p95_ms", "accuracy",
                   "reason", "wave", "previous_accuracy", "previous_p95_ms", "recipe"}
    assert all(device_keys <= set(d) for d in status["devices"])
    assert [d["state"] for d in status["devices"]].count("waiting") == len(NAMES) - 1


@pytest.mark.parametrize("died", ["before publishing", "before marking published"])
def test_a_server_that_died_mid_tick_sends_the_same_directive_again_and_starts_no_wave_twice(
    fleet: Fleet, died: str
) -> None:
    rollout_id = start_rollout(fleet.workspace.db, fleet.workspace.blobs, fleet.workspace.keys(), "digits",
                               Selection(devices=NAMES), RolloutPolicy(waves=("1", "100%")))
    with fleet.workspace.db.session() as session:  # a tick whose process dies after the commit
        fleet.engine.decide(session, fleet.now)
        lost, _ = fleet.engine.outgoing(session, fleet.now)
    if died == "before marking published":
        fleet.sent += lost  # it did reach the broker

    fleet.tick()  # the restarted server
    fleet.tick()

    [canary] = fleet.deployments(rollout_id).values()
    desired = [m for m in fleet.sent if m.topic == device_topic(TopicKind.DESIRED, fleet.ids["cam-1"])]
    assert len(desired) == (2 if died == "before marking published" else 1)
    assert {m.payload for m in desired} == {lost[0].payload}  # the same directive, not a new deployment
    assert canary.seq == 1 and fleet.audit(rollout_id).count("wave.started") == 1


def test_a_rollout_whose_step_breaks_does_not_stop_the_others(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    broken = start_rollout(fleet.workspace.db, fleet.workspace.blobs, fleet.workspace.keys(), "digits",
                           Selection(devices=("cam-1",)), RolloutPolicy(waves=("100%",)))
    with fleet.workspace.db.session() as session:  # say, a row a future version wrote differently
        rollout = session.get(Rollout, broken)
        assert rollout is not None
        rollout.policy = {**rollout.policy, "on_failure": "explode"}

    healthy = fleet.start(waves="100%", names=("cam-2",))

    assert list(fleet.deployments(healthy)) == ["cam-2"]
    assert fleet.deployments(broken) == {}
    assert f"rollout {broken}: this tick's step failed" in caplog.text


def test_the_running_server_never_imports_tensorflow_to_drive_rollouts() -> None:
    """Planning may build variants (TensorFlow) in the operator's command; the server's engine never does."""
    import subprocess
    import sys

    code = ("import sys, server.service, server.rollouts, server.rollout_cli, server.web; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_servers_deployment_states_extend_what_agents_report() -> None:
    """DeploymentState repeats UpdateState's values (plus two the server draws): they must never drift apart."""
    from server.db import queries
    from server.rollouts.states import FINAL_DEPLOYMENT_STATES, DeploymentState
    from shared.messages import UpdateState

    assert {s.value for s in UpdateState} <= {s.value for s in DeploymentState}
    assert all(DeploymentState.of(s).is_final == s.is_final for s in UpdateState)
    assert set(queries.FINAL_STATES) == {s.value for s in FINAL_DEPLOYMENT_STATES}


@contextmanager
def counted_flushes() -> Iterator[list[int]]:
    count = [0]

    def flushed(*_: object) -> None:
        count[0] += 1

    event.listen(Session, "after_flush", flushed)
    try:
        yield count
    finally:
        event.remove(Session, "after_flush", flushed)


@pytest.mark.parametrize("upgrade", [False, True], ids=["first-install", "upgrade"])
def test_a_wave_costs_a_few_flushes_whatever_its_size(fleet: Fleet, upgrade: bool) -> None:
    """Each deployment used to flush every deployment added before it (an autoflush per directive number, and
    per replaced deployment on an upgrade): quadratic in the wave, minutes for a wave of thousands."""
    more = tuple(f"box-{i:02d}" for i in range(40))
    fleet.ids |= {name: register_device(fleet.workspace.db, name, "x86-64").id for name in more}
    if upgrade:
        first = fleet.start(waves="100%", names=NAMES + more)
        for name, deployment in fleet.deployments(first).items():
            fleet.commit(name, deployment)
        fleet.tick()
    with counted_flushes() as flushes:
        rollout_id = fleet.start(waves="100%", names=NAMES + more)
    assert len(fleet.deployments(rollout_id)) == 45
    assert flushes[0] < 10, flushes
