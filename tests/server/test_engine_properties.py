"""Properties of the rollout engine: a hypothesis state machine over the real engine and a real SQLite database.

The world: model ``digits`` version 1 (built by the session template) and a
version 2 whose x86-64 variant is a different model file (made here from
version 1's rows, so nothing is built again). A few x86-64 devices are
registered up front; some run version 1, committed through an earlier
one-wave rollout, so a rollout of version 2 replaces it on them. The rollout
under test selects the devices tagged ``fleet=a``.

Devices are simulated after the agent's updater: a desired state the engine
publishes is offered to the device (or kept retained while it is offline),
which takes it when idle (keeping the newest one while busy) and reports
events, trial telemetry and its state through ``server.ingest``, as the
server's loop would apply them. Rules start the rollout, tick the engine with
a fake clock (sometimes past the report timeout), let devices report (commit,
roll back, fail; good or bad numbers; sometimes the final event is lost and
only the state tells), act as the operator (an invalid transition is a
no-op), tag and untag devices, register newcomers, disconnect devices and
reconnect them, possibly reset (a hello with directive_seq 0 and no model).

Invariants, read from the database:

(a) no wave is running or passed unless every earlier wave passed or was overridden;
(b) once a wave failed its gate, no install deployment is created unless an operator resumed;
(c) a revert is made only after a rollback, only for a device that had committed the install (or says it
    runs it) or was under way with it, and names the model file the install replaced; once the engine
    ticked after a rollback, every device that committed an install which replaced a model has a revert
    naming that model;
(d) a rollout never leaves a final state;
(e) after a drain (every device commits what it is sent, the engine ticks until nothing changes), every
    selected device's latest deployment targets the rollout's version or the model it ran before; after
    success each one was sent the version and runs it unless its install failed; after a rollback none
    runs the rolled back version unless it had nothing before or its revert failed on it;
(f) each device's deployments have strictly increasing sequence numbers in the order they were made, and
    no device is ever sent a directive older than one it was sent before.

The drain runs at teardown (and as a rule). Failures the machine found are
replayed step by step at the end of this file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import select

from server.catalog import resolve_version
from server.db import Session, queries
from server.db.models import Artifact, Deployment, Device, ModelVersion, Rollout, Wave
from server.devices import register_device
from server.ingest import apply_availability, apply_event, apply_state, apply_telemetry
from server.rollouts import (
    OnFailure,
    RolloutEngine,
    RolloutPolicy,
    abort_rollout,
    parse_waves,
    pause_rollout,
    resume_rollout,
    rollback_rollout,
    start_rollout,
)
from server.rollouts.states import DeploymentKind, DeploymentState, RolloutState, WaveState
from server.selection import Selection
from server.setup import Workspace, open_workspace
from shared import PROTOCOL_VERSION
from shared.errors import UserInputError
from shared.messages import (
    ActiveModel,
    Availability,
    BenchmarkResult,
    DeploymentOutcome,
    DesiredState,
    DeviceState,
    Event,
    Manifest,
    PreviousModel,
    Telemetry,
    decode_payload,
)
from shared.protocol import decode_versioned
from shared.topics import TopicKind, parse_topic

PROFILE = "x86-64"
TAG = ("fleet", "a")
SELECTION = Selection(tags=(TAG,))
TIMEOUT_S = 60.0
OPERATOR = "operator test@props"
# name: (tagged fleet=a, runs digits:1)
FLEET = {"dev-0": (True, True), "dev-1": (True, True), "dev-2": (True, False), "dev-3": (True, False),
         "dev-4": (False, True)}
MAX_DEVICES = 7  # newcomers register up to this many
UNDER_WAY = frozenset({"downloading", "verifying", "staged", "trial"})
OUTCOMES = ("commit", "commit", "rolled_back", "failed")
METRICS = ("good", "good", "low_accuracy", "slow", "regressed")


# -- the prepared data directory (once per module) --------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    root: Path
    v1_sha256: str  # digits:1's x86-64 model file
    v2_sha256: str  # digits:2's


def _add_version_2(workspace: Workspace) -> tuple[str, str]:
    """digits:2, as if added and built: version 1's rows with another model file for x86-64."""
    with workspace.db.session() as session:
        v1 = resolve_version(session, "digits:1")
        artifact = queries.artifact_for_ids(session, v1.id, PROFILE)
        assert artifact is not None
        v2 = ModelVersion(
            model_id=v1.model_id, version=2, source_sha256=v1.source_sha256, source_name=v1.source_name,
            eval_sha256=v1.eval_sha256, eval_samples=v1.eval_samples, num_classes=v1.num_classes,
            reference_accuracy=v1.reference_accuracy, full_eval_sha256=v1.full_eval_sha256,
            eval_labelled=v1.eval_labelled,
        )
        session.add(v2)
        session.flush()
        data = workspace.blobs.read(artifact.sha256) + b"\0digits:2"
        sha256 = workspace.blobs.put(data)
        session.add(Artifact(
            model_version_id=v2.id, profile_name=PROFILE, quantization=artifact.quantization, sha256=sha256,
            size_bytes=len(data), host_accuracy=artifact.host_accuracy, host_p50_ms=artifact.host_p50_ms,
            host_p95_ms=artifact.host_p95_ms, recipe=artifact.recipe,
        ))
        return artifact.sha256, sha256


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path) -> Prepared:
    """The template plus digits:2, the fleet registered and digits:1 committed on the devices meant to run it."""
    root = tmp_path_factory.mktemp("engine-properties") / "data"
    shutil.copytree(template_data_dir, root)
    workspace = open_workspace(root)
    try:
        v1_sha256, v2_sha256 = _add_version_2(workspace)
        ids = {name: register_device(workspace.db, name, PROFILE).id for name in FLEET}
        with workspace.db.session() as session:
            for name, (tagged, _) in FLEET.items():
                device = session.get(Device, ids[name])
                assert device is not None
                device.tags = dict([TAG]) if tagged else {}
        sims = {ids[name]: SimDevice(ids[name], name, boot="prep") for name in FLEET}
        for sim in sims.values():
            with workspace.db.session() as session:
                apply_state(session, sim.state_message())  # every device is online
        earlier = [name for name, (_, runs) in FLEET.items() if runs]
        rollout_id = start_rollout(workspace.db, workspace.blobs, workspace.keys(), "digits:1",
                                   Selection(devices=tuple(earlier)), RolloutPolicy(waves=("100%",)))
        engine = RolloutEngine(workspace.db, workspace.keys(), lambda t, p, r: _deliver(sims, t, p),
                               blobs=workspace.blobs)
        now = time.time()
        engine.tick(now)
        for sim in sims.values():
            while sim.job is not None:
                sim.step(workspace, "commit", "good", lose_event=False)
        engine.tick(now + 1)
        with workspace.db.session() as session:
            assert _rollout(session, rollout_id).state == RolloutState.SUCCEEDED.value
            for name, (_, runs) in FLEET.items():
                device = session.get(Device, ids[name])
                assert device is not None and (device.active_deployment_id is not None) is runs
    finally:
        workspace.db.close()  # the last connection checkpoints the WAL: a file copy is complete
    return Prepared(root, v1_sha256, v2_sha256)


# -- simulated devices -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A directive as a device received it."""

    deployment_id: str
    seq: int
    model: str
    version: int
    sha256: str
    quantization: str
    reference_accuracy: float

    @classmethod
    def of(cls, desired: DesiredState) -> Sent:
        manifest = decode_versioned(Manifest, desired.manifest.signed)
        directive = desired.directive.signed
        return cls(directive["deployment_id"], directive["seq"], manifest.model, manifest.version,
                   manifest.file("model").sha256, manifest.quantization, manifest.reference.accuracy)

    @classmethod
    def of_deployment(cls, deployment: Deployment) -> Sent:
        manifest = decode_versioned(Manifest, deployment.release.manifest["signed"])
        return cls(deployment.id, deployment.seq, manifest.model, manifest.version, manifest.file("model").sha256,
                   manifest.quantization, manifest.reference.accuracy)


def _benchmark(p95_ms: float) -> BenchmarkResult:
    return BenchmarkResult(
        runtime="ai_edge_litert 1.2.0", threads=1, init_ms=1.0, first_ms=1.0, warmup_runs=1, runs=20,
        mean_ms=p95_ms / 2, std_ms=0.1, min_ms=p95_ms / 4, max_ms=p95_ms, p50_ms=p95_ms / 2, p90_ms=p95_ms,
        p95_ms=p95_ms, p99_ms=p95_ms, peak_rss_bytes=50_000_000,
    )


@dataclass
class SimDevice:
    """An agent, as far as the server can tell: it finishes one install before it takes the next directive."""

    id: str
    name: str
    boot: str = "b0"
    report_seq: int = 0
    trusted_seq: int = 0
    active: Sent | None = None
    retained: Sent | None = None  # the broker's retained desired state for it
    pending: Sent | None = None  # offered while busy
    job: Sent | None = None
    job_state: str = "idle"  # accepted (nothing reported yet), downloading, trial
    outcome: DeploymentOutcome | None = None
    highest_sent: int = 0
    online: bool = True
    unheard: Sent | None = None  # the retained desired state, delivered but not yet read after a reconnect
    replaced: dict[str, str | None] = field(default_factory=dict)  # deployment id: model file it replaced

    def offer(self, sent: Sent) -> None:
        if sent.seq <= self.trusted_seq:
            return  # the one it took already, or older (refused as a replay)
        if self.job is not None:
            if self.pending is None or sent.seq > self.pending.seq:
                self.pending = sent
            return
        self._accept(sent)

    def _accept(self, sent: Sent) -> None:
        self.trusted_seq, self.job, self.job_state = sent.seq, sent, "accepted"
        self.replaced[sent.deployment_id] = self.active.sha256 if self.active else None

    def _next_seq(self) -> int:
        self.report_seq += 1
        return self.report_seq

    @property
    def update_state(self) -> str:
        if self.job is None:
            return "idle"
        return "downloading" if self.job_state == "accepted" else self.job_state  # it starts as soon as it accepts

    def state_message(self, *, hello: bool = False) -> DeviceState:
        active = None
        if self.active is not None:
            active = ActiveModel(model=self.active.model, version=self.active.version, sha256=self.active.sha256,
                                 quantization=self.active.quantization, deployment_id=self.active.deployment_id)
        return DeviceState(
            v=PROTOCOL_VERSION, device_id=self.id, boot_id=self.boot, runtime="ai_edge_litert", runtime_version="1.2.0",
            update_state=self.update_state,
            deployment_id=self.job.deployment_id if self.job else None, directive_seq=self.trusted_seq,
            active=active, hello=hello, outcome=self.outcome,
        )

    def _event(self, state: str, reason: str = "") -> Event:
        assert self.job is not None
        return Event(v=PROTOCOL_VERSION, device_id=self.id, boot_id=self.boot, seq=self._next_seq(),
                     deployment_id=self.job.deployment_id, state=state, reason=reason, ts=0.0)

    def _telemetry(self, metrics: str) -> Telemetry:
        assert self.job is not None
        reference = self.job.reference_accuracy
        accuracy = {"low_accuracy": reference - 0.3, "regressed": reference - 0.015}.get(metrics, reference)
        p95_ms = 50.0 if metrics == "slow" else 2.0
        previous = None
        if self.active is not None:
            previous = PreviousModel(model=self.active.model, version=self.active.version, sha256=self.active.sha256,
                                     accuracy=reference, p50_ms=1.0, p95_ms=2.0)
        return Telemetry(v=PROTOCOL_VERSION, device_id=self.id, boot_id=self.boot, seq=self._next_seq(),
                         deployment_id=self.job.deployment_id, kind="trial", ts=0.0, benchmark=_benchmark(p95_ms),
                         accuracy=accuracy, samples=200, previous=previous)

    @property
    def busy(self) -> bool:
        return self.job is not None or self.pending is not None or self.unheard is not None

    def step(self, workspace: Workspace, outcome: str, metrics: str, *, lose_event: bool) -> None:
        """One step of the install in hand (or take the pending directive), reported through ingest."""
        if not self.online:
            return
        if self.unheard is not None:
            unheard, self.unheard = self.unheard, None
            self.offer(unheard)
        if self.job is None:
            if self.pending is None:
                return
            self._accept(self.pending)
            self.pending = None
        messages: list[Any] = []
        if self.job_state == "accepted":
            self.job_state = "downloading"
            messages += [self._event("downloading"), self.state_message()]
        elif self.job_state == "downloading" and outcome == "failed":
            messages += self._finish("failed", "download: connection reset", lose_event)
        elif self.job_state == "downloading":
            self.job_state = "trial"
            messages += [self._event("trial"), self._telemetry(metrics), self.state_message()]
        elif outcome == "commit":
            assert self.job is not None
            self.active = self.job
            messages += self._finish("committed", "", lose_event)
        else:
            messages += self._finish("rolled_back", "trial: accuracy below the gate", lose_event)
        _ingest(workspace, messages)

    def _finish(self, state: str, reason: str, lose_event: bool) -> list[Any]:
        assert self.job is not None
        event = self._event(state, reason)
        self.outcome = DeploymentOutcome(self.job.deployment_id, state, reason)
        self.job, self.job_state = None, "idle"
        if self.pending is not None:  # the agent takes it as soon as it is idle
            pending, self.pending = self.pending, None
            if pending.seq > self.trusted_seq:
                self._accept(pending)
        return ([] if lose_event else [event]) + [self.state_message()]

    def reset(self) -> None:
        """Factory reset: nothing trusted, no model, a new boot."""
        self.boot = f"{self.boot}+"
        self.report_seq = self.trusted_seq = 0
        self.active = self.pending = self.job = self.unheard = None
        self.job_state, self.outcome = "idle", None


def _ingest(workspace: Workspace, messages: list[Any]) -> None:
    """Apply each message in its own transaction, as the server's loop would."""
    for message in messages:
        with workspace.db.session() as session:
            if isinstance(message, Event):
                apply_event(session, message)
            elif isinstance(message, Telemetry):
                apply_telemetry(session, message)
            else:
                apply_state(session, message)


def _deliver(sims: dict[str, SimDevice], topic: str, payload: bytes) -> Sent | None:
    """The broker: keep the retained desired state and hand it to the (always connected) device."""
    device_id = parse_topic(topic).device_id
    assert device_id is not None
    sim = sims[device_id]
    if not payload:
        sim.retained = None
        return None

    desired = decode_payload(TopicKind.DESIRED, payload)
    assert isinstance(desired, DesiredState)
    sent = Sent.of(desired)
    # (f) a device is never sent a directive older than one it was sent before: it would refuse it as a replay
    assert sent.seq >= sim.highest_sent, f"{sim.name} sent seq {sent.seq} after {sim.highest_sent}"
    sim.highest_sent = sent.seq
    sim.retained = sent
    if sim.online:
        sim.offer(sent)
    return sent


def _rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    assert rollout is not None
    return rollout


# -- the machine ---------------------------------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    def __init__(self, prepared: Prepared) -> None:
        super().__init__()
        self.prepared = prepared
        self.tmp = Path(tempfile.mkdtemp(prefix="engine-props-"))
        shutil.copytree(prepared.root, self.tmp / "data")
        self.workspace = open_workspace(self.tmp / "data")
        self.engine = RolloutEngine(self.workspace.db, self.workspace.keys(), self._publish,
                                    blobs=self.workspace.blobs)
        self.now = time.time()
        self.sims: dict[str, SimDevice] = {}
        self.initial: dict[str, str | None] = {}  # device id: model file it ran before the rollout
        with self.workspace.db.session() as session:
            for device in queries.devices(session):
                sim = SimDevice(device.id, device.name, trusted_seq=device.reported_seq or 0)
                if device.active_deployment_id is not None:
                    active = session.get(Deployment, device.active_deployment_id)
                    assert active is not None
                    sim.active = sim.retained = Sent.of_deployment(active)
                    sim.highest_sent = active.seq
                self.sims[device.id] = sim
                self.initial[device.id] = sim.active.sha256 if sim.active else None
        self.rollout_id: str | None = None
        self.final_states: dict[str, str] = {}  # rollout id: the final state it was first seen in
        self.blocked: set[str] | None = None  # (b) the install deployments when a wave was seen failed
        self.before_tick: dict[str, str] = {}  # install id: its state just before the last tick
        self.reverts_seen: set[str] = set()
        self.newcomers = 0
        self.clean = True  # no step failed: teardown may drain

    # -- plumbing ------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        _deliver(self.sims, topic, payload)

    def _sim(self, index: int) -> SimDevice:
        sims = sorted(self.sims.values(), key=lambda s: s.name)
        return sims[index % len(sims)]

    def _tick(self, dt: float) -> None:
        self.now += dt
        with self.workspace.db.session() as session:
            self.before_tick = {  # a device that says it runs an install committed it, whatever the record says
                d.id: DeploymentState.COMMITTED.value if d.device.active_deployment_id == d.id else d.state
                for d in self._deployments(session) if d.kind == DeploymentKind.INSTALL.value}
        self.engine.tick(self.now)
        if self.rollout_id is None:
            return
        with self.workspace.db.session() as session:
            rollout = _rollout(session, self.rollout_id)
            deployments = self._deployments(session)
            self.check_new_reverts(rollout, deployments)
            if rollout.state == RolloutState.ROLLED_BACK.value:
                self.check_rolled_back(deployments)

    def _deployments(self, session: Session) -> list[Deployment]:
        if self.rollout_id is None:
            return []
        return list(session.scalars(select(Deployment).where(Deployment.rollout_id == self.rollout_id)))

    def _tagged(self) -> int:
        with self.workspace.db.session() as session:
            return sum(SELECTION.matches(d) for d in queries.devices(session))

    # -- rules ---------------------------------------------------------------------

    @precondition(lambda self: self.rollout_id is None)
    @rule(
        waves=st.sampled_from(["1,50%,100%", "1,100%", "100%", "2,60%", "50%", "1,1,100%"]),
        on_failure=st.sampled_from(OnFailure),
        max_failure_ratio=st.sampled_from([0.0, 0.5]),
        min_reports=st.sampled_from([None, None, "1", "50%"]),
        max_p95_ms=st.sampled_from([None, 20.0]),
    )
    def start(self, waves: str, on_failure: OnFailure, max_failure_ratio: float, min_reports: str | None,
              max_p95_ms: float | None) -> None:
        self.clean = False
        if not self._tagged():
            return  # start_rollout refuses an empty selection
        policy = RolloutPolicy(waves=parse_waves(waves), on_failure=on_failure, max_failure_ratio=max_failure_ratio,
                               min_reports=min_reports, max_p95_ms=max_p95_ms, report_timeout_s=TIMEOUT_S)
        ws = self.workspace
        self.rollout_id = start_rollout(ws.db, ws.blobs, ws.keys(), "digits:2", SELECTION, policy, actor=OPERATOR)

    @precondition(lambda self: self.rollout_id is not None)
    @rule(dt=st.sampled_from([0.0, 1.0, 20.0, TIMEOUT_S + 1]))
    def tick(self, dt: float) -> None:
        self.clean = False
        self._tick(dt)

    @rule(index=st.integers(0, MAX_DEVICES - 1), outcome=st.sampled_from(OUTCOMES), metrics=st.sampled_from(METRICS),
          lose_event=st.booleans())
    def device_reports(self, index: int, outcome: str, metrics: str, lose_event: bool) -> None:
        self.clean = False
        self._sim(index).step(self.workspace, outcome, metrics, lose_event=lose_event)

    @rule(outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=MAX_DEVICES, max_size=MAX_DEVICES),
          metrics=st.sampled_from(METRICS))
    def fleet_reports(self, outcomes: list[str], metrics: str) -> None:
        """Every device takes one step."""
        self.clean = False
        for index, outcome in enumerate(outcomes[: len(self.sims)]):
            self._sim(index).step(self.workspace, outcome, metrics, lose_event=False)

    @precondition(lambda self: self.rollout_id is not None)
    @rule(action=st.sampled_from([pause_rollout, resume_rollout, abort_rollout, rollback_rollout]))
    def operator(self, action: Any) -> None:
        self.clean = False
        assert self.rollout_id is not None
        try:
            action(self.workspace.db, self.rollout_id, OPERATOR)
        except UserInputError:
            return  # not a transition from the rollout's state: nothing changed
        if action is resume_rollout:
            self.blocked = None  # (b) the operator overrode the failed wave

    @rule(index=st.integers(0, MAX_DEVICES - 1), tagged=st.booleans())
    def retag(self, index: int, tagged: bool) -> None:
        """A device joins or leaves the selection."""
        self.clean = False
        with self.workspace.db.session() as session:
            device = session.get(Device, self._sim(index).id)
            assert device is not None
            device.tags = dict([TAG]) if tagged else {}

    @precondition(lambda self: len(self.sims) < MAX_DEVICES)
    @rule(tagged=st.booleans())
    def newcomer(self, tagged: bool) -> None:
        """A new device is registered (tagged: it joins the selection) and says hello."""
        self.clean = False
        self.newcomers += 1
        row = register_device(self.workspace.db, f"new-{self.newcomers}", PROFILE)
        with self.workspace.db.session() as session:
            device = session.get(Device, row.id)
            assert device is not None
            device.tags = dict([TAG]) if tagged else {}
        sim = self.sims[row.id] = SimDevice(row.id, row.name)
        self.initial[row.id] = None
        self._hello(sim)

    @rule(index=st.integers(0, MAX_DEVICES - 1))
    def disconnect(self, index: int) -> None:
        """A device goes offline (its last will): it hears nothing and reports nothing until it reconnects."""
        self.clean = False
        sim = self._sim(index)
        sim.online = False
        with self.workspace.db.session() as session:
            apply_availability(session, sim.id, Availability(v=PROTOCOL_VERSION, online=False))

    @rule(index=st.integers(0, MAX_DEVICES - 1), reset=st.booleans(), retained_now=st.booleans())
    def reconnect(self, index: int, reset: bool, retained_now: bool) -> None:
        """A device (re)connects and says hello; reset, it comes back blank: directive_seq 0, no active model.
        The broker hands it its retained desired state now or just after the server's next tick."""
        self.clean = False
        self._reconnect(self._sim(index), reset=reset, retained_now=retained_now)

    def reset(self, index: int, *, retained_now: bool = True) -> None:
        self._reconnect(self._sim(index), reset=True, retained_now=retained_now)

    def _reconnect(self, sim: SimDevice, *, reset: bool, retained_now: bool = True) -> None:
        if reset:
            sim.reset()
        sim.online = True
        self._hello(sim)
        if sim.retained is not None:
            if retained_now:
                sim.offer(sim.retained)
            else:
                sim.unheard = sim.retained  # taken at the device's next step

    def _hello(self, sim: SimDevice) -> None:
        """What the server's loop does with a hello (ServerService._on_state)."""
        with self.workspace.db.session() as session:
            message = sim.state_message(hello=True)
            device = apply_state(session, message)
            assert device is not None
            deployment = queries.latest_deployment(session, device.id)
            if (deployment is not None and deployment.published_at is not None
                    and deployment.state not in queries.FINAL_STATES and message.directive_seq < deployment.seq):
                self.engine.resend(deployment)

    @precondition(lambda self: self.rollout_id is not None)
    @rule()
    def settle(self) -> None:
        self.clean = False
        self.drain()

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def check_database(self) -> None:
        with self.workspace.db.session() as session:
            self.check_final_states_stick(session)
            if self.rollout_id is not None:
                rollout = _rollout(session, self.rollout_id)
                deployments = self._deployments(session)
                self.check_waves_in_order(rollout.waves)
                self.check_no_install_after_a_failed_gate(rollout.waves, deployments)
            self.check_sequence_numbers(session)
        self.clean = True

    def check_final_states_stick(self, session: Session) -> None:
        """(d) a rollout never leaves a final state."""
        for rollout in session.scalars(select(Rollout)):
            seen = self.final_states.get(rollout.id)
            assert seen is None or rollout.state == seen, f"rollout {rollout.id} left {seen} for {rollout.state}"
            if RolloutState(rollout.state).is_final:
                self.final_states[rollout.id] = rollout.state

    @staticmethod
    def check_waves_in_order(waves: list[Wave]) -> None:
        """(a) no wave is running or passed unless every earlier wave passed or was overridden."""
        for wave in waves:
            if wave.state in (WaveState.RUNNING.value, WaveState.PASSED.value):
                earlier = [w.state for w in waves if w.index < wave.index]
                assert all(WaveState(s).is_through for s in earlier), f"wave {wave.index} {wave.state} after {earlier}"

    def check_no_install_after_a_failed_gate(self, waves: list[Wave], deployments: list[Deployment]) -> None:
        """(b) once a wave failed its gate, no install deployment is created unless an operator resumed."""
        installs = {d.id for d in deployments if d.kind == DeploymentKind.INSTALL.value}
        if self.blocked is not None:
            created = {d.id: d.device.name for d in deployments if d.id in installs - self.blocked}
            assert not created, f"installs created after a wave failed its gate: {created}"
        if self.blocked is None and any(w.state == WaveState.FAILED.value for w in waves):
            self.blocked = installs

    def check_new_reverts(self, rollout: Rollout, deployments: list[Deployment]) -> None:
        """(c) the reverts a tick made: only after a rollback, only to a device that had committed the install
        (or said it runs it) or was under way with it, naming the model file that install replaced."""
        reverts = [d for d in deployments if d.kind == DeploymentKind.REVERT.value]
        by_id = {d.id: d for d in deployments}
        for revert in reverts:
            if revert.id in self.reverts_seen:
                continue
            self.reverts_seen.add(revert.id)
            assert rollout.state == RolloutState.ROLLED_BACK.value, f"a revert while {rollout.state}"
            install = by_id[revert.reverts_id]  # type: ignore[index]
            was = self.before_tick.get(install.id)
            assert was == DeploymentState.COMMITTED.value or was in UNDER_WAY, (
                f"{install.device.name} was sent a revert of an install that was {was}")
            assert install.previous_release is not None
            assert revert.release.model_sha256 == install.previous_release.model_sha256

    @staticmethod
    def check_rolled_back(deployments: list[Deployment]) -> None:
        """(c) once the engine ticked after a rollback: every device whose install committed and replaced a model
        was sent that model back."""
        reverts = [d for d in deployments if d.kind == DeploymentKind.REVERT.value]
        latest: dict[str, Deployment] = {}
        for d in deployments:
            if d.kind == DeploymentKind.INSTALL.value and (d.device_id not in latest or d.seq > latest[d.device_id].seq):
                latest[d.device_id] = d
        reverted = {r.reverts_id: r for r in reverts}
        for install in latest.values():
            runs = install.state == DeploymentState.COMMITTED.value or install.device.active_deployment_id == install.id
            if runs and install.previous_release is not None:
                revert = reverted.get(install.id)
                assert revert is not None, f"{install.device.name} committed {install.id} and was not sent back"
                assert revert.release.model_sha256 == install.previous_release.model_sha256
        for install in deployments:  # an earlier install too (the device was reset and sent the version again)
            if install.state == DeploymentState.COMMITTED.value and install.previous_release is not None:
                previous = install.previous_release.model_sha256
                assert any(r.device_id == install.device_id and r.release.model_sha256 == previous for r in reverts), (
                    f"{install.device.name} committed {install.id}, replacing {previous[:12]}, and was not sent it back")

    def check_sequence_numbers(self, session: Session) -> None:
        """(f) each device's deployments have strictly increasing sequence numbers, in the order they were made."""
        rows = session.scalars(select(Deployment).order_by(Deployment.created_at)).all()
        seqs: dict[str, list[int]] = {}
        for d in rows:
            seqs.setdefault(d.device_id, []).append(d.seq)
        for device_id, numbers in seqs.items():
            assert len(set(numbers)) == len(numbers), f"{device_id} reuses a seq: {numbers}"
            ordered = [d.seq for d in sorted((d for d in rows if d.device_id == device_id),
                                            key=lambda d: (d.created_at, d.seq))]
            assert ordered == sorted(ordered), f"{device_id}: {ordered}"
            device = session.get(Device, device_id)
            assert device is not None and device.directive_seq >= max(numbers)

    # -- the end -------------------------------------------------------------------

    def _fingerprint(self) -> tuple[Any, ...]:
        with self.workspace.db.session() as session:
            rollouts = tuple((r.id, r.state) for r in session.scalars(select(Rollout)))
            waves = tuple((w.rollout_id, w.index, w.state) for w in session.scalars(select(Wave)))
            deployments = tuple(sorted((d.id, d.state, d.published_at is None)
                                       for d in session.scalars(select(Deployment))))
            devices = tuple((d.id, d.active_deployment_id, d.reported_seq, d.update_state, d.directive_seq)
                            for d in session.scalars(select(Device)))
        return rollouts, waves, deployments, devices

    def drain(self) -> None:
        """Every device commits whatever it is sent; the engine ticks until nothing changes. Then (e)."""
        for sim in self.sims.values():
            if not sim.online:
                self._reconnect(sim, reset=False)
        for _ in range(40):
            before = self._fingerprint()
            self._tick(1.0)
            for sim in self.sims.values():
                while sim.busy:
                    sim.step(self.workspace, "commit", "good", lose_event=False)
            if self._fingerprint() == before and not any(s.busy for s in self.sims.values()):
                break
        else:
            raise AssertionError("the engine never settled")
        self.check_end()

    def check_end(self) -> None:
        """(e) every selected device's latest deployment targets the rollout's version or the model it ran before;
        where the rollout ended decides which."""
        assert self.rollout_id is not None
        v1, v2 = self.prepared.v1_sha256, self.prepared.v2_sha256
        with self.workspace.db.session() as session:
            rollout = _rollout(session, self.rollout_id)
            state = RolloutState(rollout.state)
            assert state is not RolloutState.RUNNING, "a drained rollout is still running"
            for device in queries.devices(session):
                sim = self.sims[device.id]
                latest = queries.latest_deployment(session, device.id)
                target = latest.release.model_sha256 if latest is not None else None
                assert device.active_deployment_id == (sim.active.deployment_id if sim.active else None)
                if not SELECTION.matches(device):
                    continue
                assert target in (v2, self.initial[device.id], None), f"{device.name}'s latest targets {target}"
                if state is RolloutState.SUCCEEDED:  # sent the version; it runs it unless its install failed
                    assert latest is not None and latest.rollout_id == rollout.id and target == v2, device.name
                    if latest.state == DeploymentState.COMMITTED.value:
                        assert sim.active is not None and sim.active.sha256 == v2, f"{device.name} runs {sim.active}"
                    else:
                        assert DeploymentState(latest.state).is_failure, f"{device.name}: {latest.state}"
                if state is RolloutState.ROLLED_BACK and sim.active is not None and sim.active.sha256 == v2:
                    # still on the rolled back version: it had nothing before, or its revert failed on the device
                    install = self._latest(session, device.id, DeploymentKind.INSTALL)
                    revert = self._latest(session, device.id, DeploymentKind.REVERT)
                    assert install is not None
                    if install.previous_release is not None:
                        assert install.previous_release.model_sha256 == v1
                        assert revert is not None and DeploymentState(revert.state).is_failure, (
                            f"{device.name} still runs the rolled back version (revert: {revert and revert.state})")

    def _latest(self, session: Session, device_id: str, kind: DeploymentKind) -> Deployment | None:
        return session.scalar(
            select(Deployment).where(Deployment.rollout_id == self.rollout_id, Deployment.device_id == device_id,
                                     Deployment.kind == kind.value)
            .order_by(Deployment.seq.desc()).limit(1))

    def teardown(self) -> None:
        try:
            if self.clean and self.rollout_id is not None:
                self.drain()
        finally:
            self.workspace.db.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


# A longer hunt: EDGEFLEET_ENGINE_EXAMPLES=500 pytest tests/server/test_engine_properties.py
MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("EDGEFLEET_ENGINE_EXAMPLES", "50")), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_the_engine_keeps_its_invariants(prepared: Prepared) -> None:
    run_state_machine_as_test(lambda: EngineMachine(prepared), settings=MACHINE_SETTINGS)


# -- what the machine found, replayed step by step ----------------------------------------------------------------


@pytest.fixture
def machine(prepared: Prepared) -> Iterator[EngineMachine]:
    state = EngineMachine(prepared)
    yield state
    state.clean = False  # each test drains where it means to
    state.teardown()


def _index(machine: EngineMachine, name: str) -> int:
    return sorted(s.name for s in machine.sims.values()).index(name)


def test_a_reset_device_whose_reinstall_of_the_retained_directive_failed_is_sent_the_version_again(
    machine: EngineMachine,
) -> None:
    """After a factory reset the agent takes its retained desired state again: the directive it had
    committed, same sequence number. If that reinstall fails, the device is blank while its deployment
    still reads committed, and it trusts exactly that sequence number: it was reset all the same."""
    machine.start(waves="100%", on_failure=OnFailure.ROLLBACK, max_failure_ratio=0.0, min_reports=None,
                  max_p95_ms=None)
    machine.drain()
    dev0 = _index(machine, "dev-0")
    sim = machine._sim(dev0)
    assert sim.active is not None and sim.active.sha256 == machine.prepared.v2_sha256

    machine.reset(dev0)  # hello with nothing; then it takes the retained directive again
    machine.device_reports(dev0, "failed", "good", lose_event=False)  # downloading
    machine.device_reports(dev0, "failed", "good", lose_event=False)  # the download fails
    assert sim.active is None and sim.trusted_seq == sim.highest_sent

    machine.drain()  # (e): it runs the rollout's version again
    machine.check_database()


def test_a_device_that_reinstalls_a_rolled_back_version_from_its_retained_directive_is_sent_back(
    machine: EngineMachine,
) -> None:
    """A device whose install failed keeps its previous model, but the broker keeps its retained desired
    state: the rolled back version's directive. Reset, it installs that version from it after the
    rollback; once it says it runs it, it is sent its previous model like any device the rollout changed."""
    machine.start(waves="100%", on_failure=OnFailure.ROLLBACK, max_failure_ratio=0.0, min_reports=None,
                  max_p95_ms=None)
    machine.tick(0.0)
    dev1 = _index(machine, "dev-1")
    machine.device_reports(dev1, "failed", "good", lose_event=False)  # downloading
    machine.device_reports(dev1, "failed", "good", lose_event=False)  # failed: the wave fails its gate
    machine.drain()
    sim = machine._sim(dev1)
    assert sim.active is not None and sim.active.sha256 == machine.prepared.v1_sha256
    machine.check_database()
    assert sim.retained is not None and sim.retained.sha256 == machine.prepared.v2_sha256

    machine.reset(dev1)  # it takes the retained directive: the rolled back version
    machine.device_reports(dev1, "commit", "good", lose_event=False)
    machine.device_reports(dev1, "commit", "good", lose_event=False)
    machine.device_reports(dev1, "commit", "good", lose_event=False)
    assert sim.active is not None and sim.active.sha256 == machine.prepared.v2_sha256

    machine.drain()  # (e): back on its previous model
    machine.check_database()


def test_a_reset_device_sent_the_version_again_is_sent_back_on_a_rollback(machine: EngineMachine) -> None:
    """Reset after it committed the version, a device is sent it again (a second install, made while the
    device ran nothing); a later fleet rollback still owes it the model it ran before the rollout."""
    machine.start(waves="100%", on_failure=OnFailure.ROLLBACK, max_failure_ratio=0.0, min_reports=None,
                  max_p95_ms=None)
    machine.drain()
    dev0 = _index(machine, "dev-0")
    machine.reset(dev0, retained_now=False)
    machine.tick(1.0)  # the hello said directive 0 and no model: the engine sends the version again
    machine.drain()  # it reinstalls the retained directive, then takes the new one
    sim = machine._sim(dev0)
    assert sim.active is not None and sim.active.sha256 == machine.prepared.v2_sha256

    machine.operator(rollback_rollout)
    machine.tick(1.0)  # (c)
    machine.drain()  # (e)
    assert sim.active is not None and sim.active.sha256 == machine.prepared.v1_sha256
    machine.check_database()
