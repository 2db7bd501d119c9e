"""The rollout engine: a deterministic ``tick(now)`` over database state.

Each tick decides, in one transaction, everything the database says is due:
start a wave (its devices get their deployments), measure a running wave's
gate, move on, succeed, pause or roll back, bring newcomers to the selection
and reset devices up to date, and send reverts after a rollback. Directives
are signed in the same transaction; the messages are published only after it
commits, and then marked published. A server killed anywhere in between
publishes again what was not marked (a retained desired state sent twice is
harmless: agents ignore a directive they already took), and never repeats or
skips a wave, because a wave's state is committed with the deployments it
created.

A device belongs to at most one live rollout at a time: the newest one that
selects it. An older rollout that succeeded keeps converging newcomers to its
selection only while no newer rollout claims them.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from server import audit
from server.blobs import BlobStore
from server.db import Database, Session, queries
from server.db.models import Deployment, Device, Release, Rollout, RolloutRelease, Wave
from server.keys import SigningKeys
from server.lease import EngineLease
from server.releases import resign_release, sign_release, signed_release_for
from server.rollouts.directives import DIRECTIVE_LIFETIME_S, desired_payload, fresh_directive
from server.rollouts.gates import Decision, DeviceReport, WaveVerdict, evaluate_wave
from server.rollouts.policy import OnFailure, RolloutPolicy, size_of
from server.rollouts.states import (
    SUPERSEDED,
    DeploymentKind,
    DeploymentState,
    RolloutState,
    WaveState,
    move,
    superseded,
)
from server.selection import Selection
from shared.canonical import canonical_json
from shared.errors import UserInputError
from shared.failpoints import failpoint
from shared.topics import TopicKind, device_topic

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes, bool], None]  # topic, payload, retain
CONVERGING = frozenset({RolloutState.RUNNING.value, RolloutState.PAUSED.value, RolloutState.SUCCEEDED.value})
CANCELLED_BY = {
    RolloutState.ROLLED_BACK: "the rollout was rolled back before this device finished",
    RolloutState.ABORTED: "the rollout was aborted before this device started",
}


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes  # empty: clear the retained message
    retain: bool = True


def _ts(now: float) -> datetime:
    return datetime.fromtimestamp(now, timezone.utc)


def _seconds(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


class RolloutEngine:
    def __init__(
        self, db: Database, keys: SigningKeys, publish: Publish | None = None, *, blobs: BlobStore | None = None,
        lease: EngineLease | None = None,
    ) -> None:
        self.db = db
        self.keys = keys
        self.publish = publish
        self.blobs = blobs
        self.lease = lease  # None: this process is the only engine (tests, tools)

    def tick(self, now: float | None = None) -> list[Outgoing]:
        """Decide and sign in one transaction; publish after it commits; mark what was published.

        With a lease, the transaction first renews it (fencing): a replica that does not hold it decides and
        publishes nothing, and on PostgreSQL the renewal's row lock keeps any other replica from taking the
        lease until this decision committed."""
        now = time.time() if now is None else now
        try:
            with self.db.session() as session:
                leading = self.lease is None or self.lease.renew(session)
                messages: list[Outgoing] = []
                sent: list[str] = []
                if leading:
                    self.decide(session, now)
                    messages, sent = self.outgoing(session, now)
        except BaseException:
            if self.lease is not None:
                self.lease.settle(False)  # the renewal rolled back with the rest
            raise
        if self.lease is not None:
            self.lease.settle(leading)
        if messages:
            failpoint("server.engine.committed")  # decided and signed, nothing published yet
        if self.publish is not None:
            for message in messages:
                self.publish(message.topic, message.payload, message.retain)
        if messages:
            failpoint("server.engine.published")  # published, not yet marked so
        if sent:
            with self.db.session() as session:
                for deployment in queries.deployments_by_ids(session, sent):
                    deployment.published_at = _ts(now)
        return messages

    # -- deciding ----------------------------------------------------------------------

    def decide(self, session: Session, now: float) -> None:
        # One never sent whose device was given a newer directive since: it will never see it.
        for deployment in queries.superseded_unsent_deployments(session):
            deployment.state, deployment.reason = DeploymentState.FAILED.value, SUPERSEDED
            deployment.published_at = _ts(now)
        session.flush()
        latest = queries.latest_deployment_by_device(session)
        devices = list(queries.devices(session))  # every live device, once per tick
        claimed: set[str] = set()  # devices a newer live rollout looks after
        selections: set[str] = set()  # of the newer rollouts still converging their selection
        for rollout in queries.live_rollouts(session, stopped_since=_ts(now - DIRECTIVE_LIFETIME_S)):  # newest first
            selection = canonical_json(rollout.selection).decode()
            if rollout.state == RolloutState.SUCCEEDED.value and selection in selections:
                continue  # a newer rollout to the same selection has every device it could converge
            if rollout.state in CONVERGING:
                selections.add(selection)
            try:
                with session.begin_nested():  # one broken rollout must not stop the others
                    RolloutStep(self, session, rollout, now, latest, claimed).run(devices)
            except Exception:
                logger.exception("rollout %s: this tick's step failed; the others went on", rollout.id)

    def outgoing(self, session: Session, now: float) -> tuple[list[Outgoing], list[str]]:
        """The desired states to publish (directives signed now if needed) and the deployments they cover."""
        messages: list[Outgoing] = []
        sent: list[str] = []
        for deployment in queries.unpublished_deployments(session):
            sent.append(deployment.id)
            topic = device_topic(TopicKind.DESIRED, deployment.device_id)
            if DeploymentState(deployment.state).is_final:  # withdrawn after it was sent: clear it, if still the latest
                latest = queries.latest_deployment(session, deployment.device_id)
                if deployment.directive is not None and latest is not None and latest.id == deployment.id:
                    messages.append(Outgoing(topic, b""))
                continue
            fresh_directive(deployment, self.keys, now)
            logger.info("publishing deployment %s to %s", deployment.id, deployment.device.name)
            messages.append(Outgoing(topic, desired_payload(deployment)))
        return messages, sent

    def resend(self, deployment: Deployment) -> None:
        """Have the next tick publish this deployment's desired state again."""
        deployment.published_at = None

    def on_hello(self, session: Session, device: Device, directive_seq: int) -> None:
        """A device (re)connected saying which directive it trusts: retained desired state is only a hint,
        so if it has not seen its open deployment, the next tick sends it again."""
        deployment = queries.latest_deployment(session, device.id)
        if (deployment is not None and deployment.published_at is not None
                and not DeploymentState(deployment.state).is_final and directive_seq < deployment.seq):
            logger.info("re-sending deployment %s to %s", deployment.id, device.name)
            self.resend(deployment)


class RolloutStep:
    """One rollout's share of a tick."""

    def __init__(self, engine: RolloutEngine, session: Session, rollout: Rollout, now: float,
                 latest: dict[str, Deployment], claimed: set[str]) -> None:
        self.engine = engine
        self.session = session
        self.rollout = rollout
        self.now = now
        self.latest = latest
        self.claimed = claimed
        self.policy = RolloutPolicy.from_json(rollout.policy)
        self.state = RolloutState(rollout.state)
        self.installs = self._installs()
        self._logged: dict[str, set[str | None]] = {}  # audit kinds logged once per device, read once per step

    def _installs(self) -> dict[str, Deployment]:
        """The latest install deployment of each device in this rollout."""
        installs: dict[str, Deployment] = {}
        for deployment in self.rollout.deployments:
            if deployment.kind == DeploymentKind.INSTALL.value:
                held = installs.get(deployment.device_id)
                if held is None or deployment.seq > held.seq:
                    installs[deployment.device_id] = deployment
        return installs

    def run(self, devices: list[Device]) -> None:
        if self.state is RolloutState.ROLLED_BACK:
            self.revert_changed()
            return
        if self.state is RolloutState.ABORTED:
            self.cancel_unstarted()
            return
        if self.state is RolloutState.FAILED:
            return
        selection = Selection.from_json(self.rollout.selection)
        selected = [d for d in devices
                    if selection.matches(d) and d.id not in self.claimed and not self._newer_rollout_has(d)]
        if self.state is RolloutState.SUCCEEDED:
            self.converge(selected, wave=len(self.rollout.waves) - 1)
        else:
            self.advance(selected)
        self.claimed.update(d.id for d in selected)

    # -- waves -------------------------------------------------------------------------

    def advance(self, selected: list[Device]) -> None:
        if not selected and all(self._excluded(d) for d in self.installs.values()):
            why = "taken over by newer rollouts or removed" if self.installs else "no longer selected"
            self.set_state(RolloutState.FAILED, f"no device left to roll out to: every one was {why}")
            return
        for wave in self.rollout.waves:
            state = WaveState(wave.state)
            if state.is_through:
                continue
            if state is WaveState.FAILED:
                return  # paused on it: an operator resumes (overriding it) or rolls back
            if state is WaveState.WAITING:
                if self.state is RolloutState.PAUSED:
                    return
                self.start_wave(wave, selected)
                state = WaveState(wave.state)
            if wave.index == len(self.rollout.waves) - 1 and self.state is RolloutState.RUNNING:
                self.converge(selected, wave=wave.index)  # newcomers join the last wave
            verdict = self.measure(wave)
            if verdict.decision is Decision.PENDING:
                return
            if verdict.decision is Decision.FAILED:
                self.gate_failed(wave, verdict)
                return
            wave.state, wave.decided_at = move(state, WaveState.PASSED).value, _ts(self.now)
            self.log("wave.passed", f"wave {wave.index + 1} ({wave.spec}) passed its gate: {self._gates(verdict)}",
                     data={"wave": wave.index, "gates": wave.gates})
            if self.state is RolloutState.PAUSED:
                return
        if self.state is RolloutState.RUNNING:
            self.set_state(RolloutState.SUCCEEDED, "every wave passed its gate")

    def start_wave(self, wave: Wave, selected: list[Device]) -> None:
        """Give the wave's devices their deployments."""
        target = max(size_of(wave.spec, len(selected) + self._assigned_elsewhere(selected)), len(self.installs))
        waiting = [d for d in selected if d.id not in self.installs]
        waiting.sort(key=lambda d: (not d.online, d.last_seen is None, d.name))  # a canary that is there
        chosen = waiting[: max(0, target - len(self.installs))]
        for device in chosen:
            self.deploy(device, wave.index)
        wave.state, wave.started_at = move(WaveState(wave.state), WaveState.RUNNING).value, _ts(self.now)
        wave.target_count = len(self.installs)
        self.log("wave.started", f"wave {wave.index + 1} ({wave.spec}) started: "
                 f"{', '.join(d.name for d in chosen) or 'no new device'}",
                 data={"wave": wave.index, "devices": [d.name for d in chosen], "target_count": wave.target_count})

    def _assigned_elsewhere(self, selected: list[Device]) -> int:
        """Devices this rollout already sent to that no longer match (they still count in the sizes)."""
        ids = {d.id for d in selected}
        return sum(1 for device_id in self.installs if device_id not in ids)

    def measure(self, wave: Wave) -> WaveVerdict:
        reports = [self._report(d) for d in self.installs.values()
                   if d.wave == wave.index and not self._excluded(d)]
        floor = self.policy.accuracy_gate(self.rollout.model_version.reference_accuracy)
        verdict = evaluate_wave(reports, self.policy, floor)
        wave.gates = [
            {"name": g.name, "measured": g.measured, "threshold": g.threshold, "passed": g.passed, "detail": g.detail}
            for g in verdict.gates
        ]
        return verdict

    @staticmethod
    def _excluded(deployment: Deployment) -> bool:
        """Not part of the wave's verdict: withdrawn, its device removed, or a newer rollout took over."""
        state = DeploymentState(deployment.state)
        return state in (DeploymentState.CANCELLED, DeploymentState.REMOVED) or superseded(deployment.reason)

    def _report(self, deployment: Deployment) -> DeviceReport:
        state = DeploymentState(deployment.state)
        timed_out = (
            not state.is_final and deployment.published_at is not None
            and self.now - _seconds(deployment.published_at) > self.policy.report_timeout_s
        )
        if timed_out and deployment.timed_out_at is None:
            deployment.timed_out_at = _ts(self.now)
            self.log("device.timed_out", f"{deployment.device.name} did not report within "
                     f"{self.policy.report_timeout_s:g} s (last state {state.value}): counted as failed",
                     device=deployment.device, data={"deployment": deployment.id, "state": state.value})
        return DeviceReport(
            device=deployment.device.name, final=state.is_final, failed=state.is_failure or timed_out,
            timed_out=timed_out, accuracy=deployment.accuracy, p95_ms=deployment.p95_ms,
            previous_accuracy=deployment.previous_accuracy, previous_p95_ms=deployment.previous_p95_ms,
        )

    def gate_failed(self, wave: Wave, verdict: WaveVerdict) -> None:
        wave.state, wave.decided_at = move(WaveState(wave.state), WaveState.FAILED).value, _ts(self.now)
        why = "; ".join(g.describe() for g in verdict.failed_gates())
        self.log("wave.gate_failed", f"wave {wave.index + 1} ({wave.spec}) failed its gate: {why}",
                 data={"wave": wave.index, "gates": wave.gates})
        reason = f"wave {wave.index + 1} failed its gate: {why}"
        if self.policy.on_failure is OnFailure.PAUSE:
            if self.state is RolloutState.RUNNING:
                self.set_state(RolloutState.PAUSED, reason)
            return
        self.set_state(RolloutState.ROLLED_BACK, reason)
        self.revert_changed()

    # -- devices -----------------------------------------------------------------------

    def converge(self, selected: list[Device], wave: int) -> None:
        """Newcomers to the selection, and devices reset to a blank slot, get the rollout's version."""
        for device in selected:
            deployment = self.installs.get(device.id)
            if deployment is None:
                if self.deploy(device, wave) is not None:
                    self.log("device.joined", f"{device.name} joined the selection: sent the rollout's version",
                             device=device)
            elif self._was_reset(device, deployment) and self.deploy(device, wave) is not None:
                self.log("device.reset", f"{device.name} came back without the model it committed "
                         f"(it trusts directive {device.reported_seq}, was sent {deployment.seq}): sent it again",
                         device=device)

    @staticmethod
    def _was_reset(device: Device, deployment: Deployment) -> bool:
        """Committed, then back without it: a hello after the commit (with replicas, a device's states and its
        events go through different servers, so its last state may be applied after the commit yet be older)."""
        return (
            deployment.state == DeploymentState.COMMITTED.value and device.online
            and device.reported_seq is not None and device.reported_seq <= deployment.seq
            and device.active_deployment_id != deployment.id and device.update_state == "idle"
            and device.last_hello_at is not None and _seconds(device.last_hello_at) >= _seconds(deployment.updated_at)
        )

    def _newer_rollout_has(self, device: Device) -> bool:
        latest = self.latest.get(device.id)
        return (latest is not None and latest.rollout_id != self.rollout.id
                and latest.rollout.created_at > self.rollout.created_at)

    def deploy(self, device: Device, wave: int, *, kind: DeploymentKind = DeploymentKind.INSTALL,
               release: Release | None = None, reverts: Deployment | None = None) -> Deployment | None:
        """A new deployment (and directive sequence number) for ``device``; None when its profile has no variant."""
        release = release or self._release_for(device)
        if release is None:
            return None
        previous = None
        if kind is DeploymentKind.INSTALL and device.active_deployment_id is not None:
            # A committed row: no need to flush the deployments added so far first (once per device: quadratic).
            with self.session.no_autoflush:
                active = self.session.get(Deployment, device.active_deployment_id)
            previous = active.release_id if active is not None and active.device_id == device.id else None
        if kind is DeploymentKind.INSTALL and previous is None and device.id in self.installs:
            previous = self.installs[device.id].previous_release_id  # sent again after a reset: still owed that
        seq = queries.next_directive_seq(self.session, device)
        deployment = Deployment(
            id=f"dep-{secrets.token_hex(6)}", rollout_id=self.rollout.id, device_id=device.id, release_id=release.id,
            seq=seq, wave=wave, kind=kind.value, reverts_id=reverts.id if reverts else None,
            state=DeploymentState.PENDING.value, reason="",
            previous_release_id=previous,
            min_accuracy_gate=self.policy.accuracy_gate(self.rollout.model_version.reference_accuracy)
            if kind is DeploymentKind.INSTALL else 0.0,
            created_at=_ts(self.now), updated_at=_ts(self.now),
        )
        deployment.device, deployment.release, deployment.rollout = device, release, self.rollout
        self.session.add(deployment)
        self.latest[device.id] = deployment
        if kind is DeploymentKind.INSTALL:
            self.installs[device.id] = deployment
        return deployment

    def _release_for(self, device: Device) -> Release | None:
        held = next((r for r in self.rollout.releases if r.profile_name == device.profile_name), None)
        if held is not None:
            return held.release
        artifact = queries.artifact_for_ids(self.session, self.rollout.model_version_id, device.profile_name)
        if artifact is None or self.engine.blobs is None:
            if self._first("device.skipped", device):
                version = self.rollout.model_version
                self.log("device.skipped", f"{device.name} joined, but no variant of {version.model.name}:"
                         f"{version.version} is built for profile {device.profile_name}: run 'edgefleet model build "
                         f"{version.model.name}:{version.version} --profile {device.profile_name}'", device=device)
            return None
        if self.engine.keys.release is None:  # offline: only a release signed elsewhere and imported
            version = self.rollout.model_version
            try:
                release = signed_release_for(self.session, artifact, self.engine.keys.root,
                                             f"{version.model.name}:{version.version}")
            except UserInputError as exc:
                if self._first("device.skipped", device):
                    self.log("device.skipped", f"{device.name} joined, but {exc}", device=device)
                return None
        else:
            release = sign_release(self.session, self.engine.blobs, self.engine.keys, artifact)
        self.session.add(RolloutRelease(rollout_id=self.rollout.id, profile_name=device.profile_name,
                                        release_id=release.id))
        self.session.flush()
        self.session.refresh(self.rollout, ["releases"])
        return release

    # -- stopping ----------------------------------------------------------------------

    def revert_changed(self) -> None:
        """Every device this rollout changed gets its previous version back; open ones are withdrawn."""
        reverted = {d.reverts_id for d in self.rollout.deployments if d.kind == DeploymentKind.REVERT.value}
        for deployment in list(self.installs.values()):
            device = deployment.device
            state = DeploymentState(deployment.state)
            # committed, or recorded failed while the device says it runs it (reinstalled from its retained
            # desired state after a reset)
            if state is DeploymentState.COMMITTED or device.active_deployment_id == deployment.id:
                if deployment.id in reverted or device.removed_at is not None or self._moved_on(deployment):
                    continue
                self._revert(deployment)
            elif not state.is_final:
                under_way = deployment.published_at is not None and state is not DeploymentState.PENDING
                self._cancel(deployment, CANCELLED_BY[RolloutState.ROLLED_BACK])
                if under_way:
                    self._revert(deployment)  # a newer directive stops it before its trial
        self._cancel_waiting_waves()

    def _moved_on(self, deployment: Deployment) -> bool:
        latest = self.latest.get(deployment.device_id)
        return latest is not None and latest.seq > deployment.seq and latest.rollout_id != self.rollout.id

    def _revert(self, deployment: Deployment) -> None:
        device = deployment.device
        if deployment.previous_release is None:
            if self._first("rollback.no_previous", device):
                self.log("rollback.no_previous", f"{device.name} had no previous model: it keeps this version",
                         device=device)
            return
        if self.engine.keys.release is None:
            if self._first("rollback.needs_release_key", device):
                previous = deployment.previous_release.artifact.model_version
                self.log("rollback.needs_release_key",
                         f"{device.name} cannot be sent back to {previous.model.name}:{previous.version}: re-signing "
                         "its release needs the release key, which is offline; prepare, sign and import a release "
                         "of it and roll that out", device=device)
            return
        release = resign_release(self.session, self.engine.keys, deployment.previous_release)
        revert = self.deploy(device, deployment.wave or 0, kind=DeploymentKind.REVERT, release=release,
                             reverts=deployment)
        assert revert is not None
        previous = deployment.previous_release.artifact.model_version
        self.log("rollback.sent", f"{device.name} is sent back to {previous.model.name}:{previous.version}",
                 device=device, data={"deployment": revert.id, "reverts": deployment.id})

    def cancel_unstarted(self) -> None:
        """After an abort: what was sent and not yet started is withdrawn; what is under way finishes."""
        for deployment in self.installs.values():
            if deployment.state == DeploymentState.PENDING.value:
                self._cancel(deployment, CANCELLED_BY[RolloutState.ABORTED])
        self._cancel_waiting_waves()

    def _cancel(self, deployment: Deployment, reason: str) -> None:
        deployment.state, deployment.reason = DeploymentState.CANCELLED.value, reason
        deployment.updated_at = _ts(self.now)
        if deployment.published_at is not None:
            deployment.published_at = None  # the next publish clears its retained desired state
        self.log("device.cancelled", f"{deployment.device.name}: {reason}", device=deployment.device,
                 data={"deployment": deployment.id})

    def _cancel_waiting_waves(self) -> None:
        for wave in self.rollout.waves:
            if wave.state in (WaveState.WAITING.value, WaveState.RUNNING.value):
                wave.state = move(WaveState(wave.state), WaveState.CANCELLED).value

    # -- bookkeeping -------------------------------------------------------------------

    def _first(self, kind: str, device: Device) -> bool:
        """True the first time this rollout logs ``kind`` for ``device`` (one query per kind and step)."""
        if kind not in self._logged:
            self._logged[kind] = queries.audited_devices(self.session, kind, self.rollout.id)
        if device.id in self._logged[kind]:
            return False
        self._logged[kind].add(device.id)
        return True

    def set_state(self, target: RolloutState, reason: str) -> None:
        self.rollout.state = move(self.state, target).value
        self.rollout.state_reason = reason
        self.state = target
        if target is not RolloutState.PAUSED:
            self.rollout.finished_at = _ts(self.now)
        self.log(f"rollout.{target.value}", f"rollout {target.value}: {reason}")

    def log(self, kind: str, message: str, *, device: Device | None = None, data: dict[str, object] | None = None,
            ) -> None:
        audit.record(self.session, kind, message, rollout_id=self.rollout.id,
                     device_id=device.id if device else None, data=dict(data or {}))

    @staticmethod
    def _gates(verdict: WaveVerdict) -> str:
        return "; ".join(g.describe() for g in verdict.gates)

