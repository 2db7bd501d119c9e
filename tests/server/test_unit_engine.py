"""The rollout engine's ``tick(now)``, driven with a recording publisher."""

from __future__ import annotations

import hashlib
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import undefer

from server.db import Database
from server.db.models import Deployment, Rollout
from server.devices import register_device
from server.ingest import apply_event
from server.rollouts import DIRECTIVE_LIFETIME_S, RolloutEngine
from server.setup import Workspace
from shared import PROTOCOL_VERSION
from shared.errors import SignatureError
from shared.messages import DesiredState, Event, decode_payload
from shared.signing import KeyRole, TrustedKeys, verify_directive, verify_manifest
from shared.topics import TopicKind, device_topic
from tests.server.rollout_helpers import start_all_at_once

Published = list[tuple[str, bytes, bool]]


class Recorder:
    """A publish callable that remembers every call."""

    def __init__(self) -> None:
        self.calls: Published = []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.calls.append((topic, payload, retain))


def trusted_keys(workspace: Workspace) -> TrustedKeys:
    public = workspace.keys().public_texts()
    return TrustedKeys.from_text({KeyRole.RELEASE: [public[KeyRole.RELEASE]], KeyRole.DIRECTOR: [public[KeyRole.DIRECTOR]]})


def deployments_of(db: Database, rollout_id: str) -> dict[str, Deployment]:
    """{device id: deployment}, detached (the session factory does not expire on commit)."""
    with db.session() as session:
        rows = session.scalars(select(Deployment).options(undefer(Deployment.directive))
                               .where(Deployment.rollout_id == rollout_id)).all()
        return {d.device_id: d for d in rows}


def rollout_state(db: Database, rollout_id: str) -> str:
    with db.session() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        return rollout.state


def report(db: Database, device_id: str, deployment_id: str, state: str, seq: int) -> None:
    with db.session() as session:
        apply_event(
            session,
            Event(v=PROTOCOL_VERSION, device_id=device_id, boot_id="b", seq=seq, deployment_id=deployment_id,
                  state=state, reason="", ts=float(seq)),
        )


@pytest.fixture
def devices(workspace: Workspace) -> dict[str, str]:
    """{name: device id} of three x86-64 devices."""
    return {name: register_device(workspace.db, name, "x86-64").id for name in ("cam-1", "cam-2", "cam-3")}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def engine(workspace: Workspace, recorder: Recorder) -> RolloutEngine:
    return RolloutEngine(workspace.db, workspace.keys(), recorder)


def start(workspace: Workspace, *names: str, **kwargs: float) -> str:
    return start_all_at_once(workspace, *names, **kwargs)


# -- publishing new deployments ------------------------------------------------------------


def test_tick_publishes_one_retained_desired_state_per_new_deployment(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder
) -> None:
    rollout_id = start(workspace, "cam-1", "cam-2", "cam-3")

    engine.tick(time.time())

    topics = sorted(topic for topic, _, _ in recorder.calls)
    assert topics == sorted(device_topic(TopicKind.DESIRED, device_id) for device_id in devices.values())
    assert all(retain for _, _, retain in recorder.calls)
    assert all(d.published_at is not None and d.directive is not None for d in deployments_of(workspace.db, rollout_id).values())


def test_the_desired_state_verifies_with_the_workspaces_public_keys(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder
) -> None:
    rollout_id = start(workspace, "cam-1")
    now = time.time()  # the manifest is stamped with the wall clock when the release is signed
    engine.tick(now)

    [(topic, payload, _)] = recorder.calls
    desired = decode_payload(TopicKind.DESIRED, payload)
    assert isinstance(desired, DesiredState)
    trusted = trusted_keys(workspace)
    manifest = verify_manifest(desired.manifest, trusted, now=now)
    directive = verify_directive(
        desired.directive, trusted, now=now, device_id=devices["cam-1"], manifest_envelope=desired.manifest
    )
    deployment = deployments_of(workspace.db, rollout_id)[devices["cam-1"]]
    assert topic == device_topic(TopicKind.DESIRED, devices["cam-1"])
    assert (directive.deployment_id, directive.rollout_id, directive.seq) == (deployment.id, rollout_id, 1)
    assert (directive.issued, directive.expires) == (int(now), int(now) + DIRECTIVE_LIFETIME_S)
    assert (manifest.model, manifest.version, manifest.profile, manifest.quantization) == (
        "digits", 1, "x86-64", "dynamic_range",
    )
    assert sorted(f.role for f in manifest.files) == ["eval", "model"]
    for entry in manifest.files:  # every file the manifest names is in the blob store, byte for byte
        assert hashlib.sha256(workspace.blobs.read(entry.sha256)).hexdigest() == entry.sha256


def test_directives_are_signed_by_the_director_key_only(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder
) -> None:
    start(workspace, "cam-1")
    now = time.time()
    engine.tick(now)
    desired = decode_payload(TopicKind.DESIRED, recorder.calls[0][1])
    public = workspace.keys().public_texts()
    release_only = TrustedKeys.from_text({KeyRole.RELEASE: [public[KeyRole.RELEASE]]})

    verify_manifest(desired.manifest, release_only, now=now)
    with pytest.raises(SignatureError, match="no director key"):
        verify_directive(desired.directive, release_only, now=now, device_id=devices["cam-1"],
                         manifest_envelope=desired.manifest)


@pytest.mark.parametrize(
    ("min_accuracy", "max_accuracy_drop"),
    [(0.0, 0.02), (0.0, 0.3), (0.99, 0.02), (0.5, 0.0)],
)
def test_the_gate_is_the_higher_of_the_floor_and_the_reference_minus_the_drop(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder,
    min_accuracy: float, max_accuracy_drop: float,
) -> None:
    rollout_id = start(workspace, "cam-1", min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop)
    now = time.time()
    engine.tick(now)

    desired = decode_payload(TopicKind.DESIRED, recorder.calls[0][1])
    trusted = trusted_keys(workspace)
    manifest = verify_manifest(desired.manifest, trusted, now=now)
    directive = verify_directive(desired.directive, trusted, now=now, device_id=devices["cam-1"],
                                 manifest_envelope=desired.manifest)
    expected = max(min_accuracy, manifest.reference.accuracy - max_accuracy_drop)
    assert directive.gates.min_accuracy == pytest.approx(expected, abs=1e-6)
    assert deployments_of(workspace.db, rollout_id)[devices["cam-1"]].min_accuracy_gate == pytest.approx(expected, abs=1e-6)


def test_a_second_tick_publishes_nothing_new(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder
) -> None:
    start(workspace, "cam-1", "cam-2")
    now = time.time()
    engine.tick(now)
    first = list(recorder.calls)

    engine.tick(now + 1)
    engine.tick(now + 600)  # within the report timeout

    assert recorder.calls == first


def test_a_later_rollout_is_published_on_the_next_tick(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder
) -> None:
    start(workspace, "cam-1")
    now = time.time()
    engine.tick(now)
    start(workspace, "cam-2")

    engine.tick(now + 1)

    assert [topic for topic, _, _ in recorder.calls] == [
        device_topic(TopicKind.DESIRED, devices["cam-1"]),
        device_topic(TopicKind.DESIRED, devices["cam-2"]),
    ]


def test_send_re_signs_an_expiring_directive(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder
) -> None:
    rollout_id = start(workspace, "cam-1")
    now = time.time()
    engine.tick(now)
    deployment_id = deployments_of(workspace.db, rollout_id)[devices["cam-1"]].id
    later = now + DIRECTIVE_LIFETIME_S * 0.75  # past half its lifetime

    with workspace.db.session() as session:
        deployment = session.get(Deployment, deployment_id)
        assert deployment is not None
        engine.resend(deployment)  # as after a hello
    engine.tick(later)

    desired = decode_payload(TopicKind.DESIRED, recorder.calls[-1][1])
    directive = verify_directive(desired.directive, trusted_keys(workspace), now=later, device_id=devices["cam-1"],
                                 manifest_envelope=desired.manifest)
    assert directive.issued == int(later)
    assert directive.seq == 1  # same deployment, same sequence number


# -- settling rollouts -----------------------------------------------------------------------


def test_a_rollout_succeeds_when_every_device_committed(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine
) -> None:
    rollout_id = start(workspace, "cam-1", "cam-2")
    now = time.time()
    engine.tick(now)
    deps = deployments_of(workspace.db, rollout_id)

    report(workspace.db, devices["cam-1"], deps[devices["cam-1"]].id, "committed", 1)
    engine.tick(now + 1)
    assert rollout_state(workspace.db, rollout_id) == "running"  # cam-2 has not reported yet

    report(workspace.db, devices["cam-2"], deps[devices["cam-2"]].id, "trial", 1)
    engine.tick(now + 2)
    assert rollout_state(workspace.db, rollout_id) == "running"

    report(workspace.db, devices["cam-2"], deps[devices["cam-2"]].id, "committed", 2)
    engine.tick(now + 3)
    with workspace.db.session() as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        assert rollout.state == "succeeded"
        assert rollout.finished_at is not None


@pytest.mark.parametrize("bad", ["rolled_back", "failed"])
def test_a_rollout_is_rolled_back_when_a_device_did_not_commit(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, bad: str
) -> None:
    rollout_id = start(workspace, "cam-1", "cam-2")
    now = time.time()
    engine.tick(now)
    deps = deployments_of(workspace.db, rollout_id)

    report(workspace.db, devices["cam-1"], deps[devices["cam-1"]].id, "committed", 1)
    report(workspace.db, devices["cam-2"], deps[devices["cam-2"]].id, bad, 1)
    engine.tick(now + 1)

    assert rollout_state(workspace.db, rollout_id) == "rolled_back"  # the default failure policy


def test_a_settled_rollout_stays_settled(workspace: Workspace, devices: dict[str, str], engine: RolloutEngine) -> None:
    rollout_id = start(workspace, "cam-1")
    now = time.time()
    engine.tick(now)
    dep = deployments_of(workspace.db, rollout_id)[devices["cam-1"]]
    report(workspace.db, devices["cam-1"], dep.id, "committed", 1)
    engine.tick(now + 1)
    report(workspace.db, devices["cam-1"], dep.id, "rolled_back", 2)  # e.g. a later rollback

    engine.tick(now + 2)

    assert rollout_state(workspace.db, rollout_id) == "succeeded"


# -- superseded deployments --------------------------------------------------------------------


def test_an_unpublished_deployment_superseded_by_a_newer_rollout_fails(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine, recorder: Recorder
) -> None:
    older = start(workspace, "cam-1", "cam-2")
    newer = start(workspace, "cam-1")  # before any tick: cam-1's older deployment was never published

    engine.tick(time.time())

    old = deployments_of(workspace.db, older)
    new = deployments_of(workspace.db, newer)
    assert old[devices["cam-1"]].state == "failed"
    assert "superseded" in old[devices["cam-1"]].reason
    assert old[devices["cam-2"]].state == "pending"
    assert (old[devices["cam-1"]].seq, new[devices["cam-1"]].seq) == (1, 2)
    desired_for_cam1 = [p for t, p, _ in recorder.calls if t == device_topic(TopicKind.DESIRED, devices["cam-1"])]
    assert len(desired_for_cam1) == 1
    directive = decode_payload(TopicKind.DESIRED, desired_for_cam1[0]).directive.signed
    assert (directive["deployment_id"], directive["seq"]) == (new[devices["cam-1"]].id, 2)
    assert len(recorder.calls) == 2  # cam-1's newer deployment and cam-2's older one


def test_a_rollout_whose_only_deployment_was_superseded_fails(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine
) -> None:
    older = start(workspace, "cam-1")
    newer = start(workspace, "cam-1")

    engine.tick(time.time())

    assert rollout_state(workspace.db, older) == "failed"
    assert rollout_state(workspace.db, newer) == "running"


def test_a_published_deployment_superseded_by_a_newer_rollout_is_settled(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine
) -> None:
    older = start(workspace, "cam-1")
    now = time.time()
    engine.tick(now)  # published, but cam-1 is offline and never sees it
    newer = start(workspace, "cam-1")
    engine.tick(now + 1)  # the retained desired state now names only the newer deployment
    dep = deployments_of(workspace.db, newer)[devices["cam-1"]]
    report(workspace.db, devices["cam-1"], dep.id, "committed", 1)

    engine.tick(now + 2)

    assert rollout_state(workspace.db, newer) == "succeeded"
    assert deployments_of(workspace.db, older)[devices["cam-1"]].state == "failed"
    assert rollout_state(workspace.db, older) == "failed"


def test_a_sent_deployment_a_newer_rollout_supersedes_stays_open_while_the_device_installs_it(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine
) -> None:
    """The agent finishes the install it is in before it takes the next directive: the older deployment
    ends as the device says (committed here), not as "failed" the moment the newer rollout starts."""
    older = start(workspace, "cam-1")
    now = time.time()
    engine.tick(now)
    old = deployments_of(workspace.db, older)[devices["cam-1"]]
    report(workspace.db, devices["cam-1"], old.id, "downloading", 1)
    newer = start(workspace, "cam-1")

    engine.tick(now + 1)
    assert deployments_of(workspace.db, older)[devices["cam-1"]].state == "downloading"
    report(workspace.db, devices["cam-1"], old.id, "committed", 2)
    new = deployments_of(workspace.db, newer)[devices["cam-1"]]
    report(workspace.db, devices["cam-1"], new.id, "committed", 3)
    engine.tick(now + 2)

    assert deployments_of(workspace.db, older)[devices["cam-1"]].state == "committed"
    assert (rollout_state(workspace.db, older), rollout_state(workspace.db, newer)) == ("succeeded", "succeeded")


def test_the_devices_own_late_account_replaces_a_superseded_guess(
    workspace: Workspace, devices: dict[str, str], engine: RolloutEngine
) -> None:
    """Its final event was delayed (resent from the outbox) behind the newer deployment's events."""
    older = start(workspace, "cam-1")
    now = time.time()
    engine.tick(now)
    newer = start(workspace, "cam-1")
    engine.tick(now + 1)
    old = deployments_of(workspace.db, older)[devices["cam-1"]]
    new = deployments_of(workspace.db, newer)[devices["cam-1"]]
    report(workspace.db, devices["cam-1"], new.id, "downloading", 3)
    guessed = deployments_of(workspace.db, older)[devices["cam-1"]]
    assert (guessed.state, guessed.reason) == ("failed", "superseded by a newer rollout")

    report(workspace.db, devices["cam-1"], old.id, "rolled_back", 2)  # late, but the device's own word
    report(workspace.db, devices["cam-1"], old.id, "committed", 4)  # a final state reported by the device sticks
    row = deployments_of(workspace.db, older)[devices["cam-1"]]
    assert row.state == "rolled_back"
    assert new.seq > old.seq
