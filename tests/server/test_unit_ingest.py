"""Ingest: agent reports applied to a real SQLite registry (no broker).

Every test works in its own copy of a data directory with ``digits:1``
(see ``conftest.py``), registers two x86-64 devices and starts one rollout
to both, then feeds messages through ``server.ingest`` inside ``db.session()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from server.db import Database
from server.db.models import Deployment, Device, EventRecord, TelemetryRecord
from server.devices import register_device
from server.ingest import apply_availability, apply_event, apply_state, apply_telemetry, settle_superseded
from server.rollouts import start_rollout
from server.rollouts.states import SUPERSEDED
from server.selection import Selection
from server.setup import Workspace
from shared import PROTOCOL_VERSION
from shared.messages import (
    REJECTED,
    ActiveModel,
    Availability,
    BenchmarkResult,
    DeploymentOutcome,
    DeviceState,
    Event,
    Telemetry,
    UpdateState,
)
from tests.server.rollout_helpers import ALL_AT_ONCE, start_all_at_once

NOW = 1_700_000_000.0
BOOT = "boot-1"


@dataclass(frozen=True)
class Fleet:
    db: Database
    cam: str  # device id of cam-1
    other: str  # device id of cam-2
    rollout: str
    deployment: str  # cam-1's deployment
    other_deployment: str  # cam-2's deployment


def _rollout_to(workspace: Workspace, *names: str) -> tuple[str, dict[str, str]]:
    """Start a rollout of digits to ``names``; returns (rollout id, {device id: deployment id})."""
    rollout_id = start_all_at_once(workspace, *names)
    with workspace.db.session() as session:
        deployments = session.scalars(select(Deployment).where(Deployment.rollout_id == rollout_id)).all()
        return rollout_id, {d.device_id: d.id for d in deployments}


@pytest.fixture
def fleet(workspace: Workspace) -> Fleet:
    cam = register_device(workspace.db, "cam-1", "x86-64")
    other = register_device(workspace.db, "cam-2", "x86-64")
    rollout_id, deployments = _rollout_to(workspace, "cam-1", "cam-2")
    return Fleet(workspace.db, cam.id, other.id, rollout_id, deployments[cam.id], deployments[other.id])


# -- message factories ----------------------------------------------------------------


def event(device_id: str, deployment_id: str, state: UpdateState, seq: int, *, boot: str = BOOT, reason: str = "") -> Event:
    return Event(
        v=PROTOCOL_VERSION, device_id=device_id, boot_id=boot, seq=seq, deployment_id=deployment_id,
        state=state.value, reason=reason, ts=NOW + seq,
    )


def benchmark(p50_ms: float, p95_ms: float) -> BenchmarkResult:
    return BenchmarkResult(
        runtime="ai_edge_litert 1.2.0", threads=2, init_ms=3.0, first_ms=1.5, warmup_runs=1, runs=50,
        mean_ms=p50_ms, std_ms=0.05, min_ms=p50_ms / 2, max_ms=p95_ms * 1.5, p50_ms=p50_ms, p90_ms=p95_ms * 0.95,
        p95_ms=p95_ms, p99_ms=p95_ms * 1.2, peak_rss_bytes=80_000_000,
    )


def telemetry(
    device_id: str, deployment_id: str | None, seq: int, *, boot: str = BOOT, p50_ms: float = 0.21,
    p95_ms: float = 0.34, accuracy: float | None = 0.975,
) -> Telemetry:
    return Telemetry(
        v=PROTOCOL_VERSION, device_id=device_id, boot_id=boot, seq=seq, deployment_id=deployment_id, kind="trial",
        ts=NOW + seq, benchmark=benchmark(p50_ms, p95_ms), accuracy=accuracy, samples=200,
    )


def device_state(device_id: str, *, active: ActiveModel | None, update_state: str = "idle", hello: bool = False) -> DeviceState:
    return DeviceState(
        v=PROTOCOL_VERSION, device_id=device_id, boot_id=BOOT, runtime="ai_edge_litert", runtime_version="1.2.0",
        update_state=update_state, deployment_id=active.deployment_id if active else None, directive_seq=1,
        active=active, hello=hello,
    )


def apply(db: Database, *messages: Any) -> None:
    """Apply each message in its own session, the way separate batches would."""
    for message in messages:
        with db.session() as session:
            if isinstance(message, Event):
                apply_event(session, message)
            elif isinstance(message, Telemetry):
                apply_telemetry(session, message)
            else:
                raise TypeError(message)


def deployment_row(db: Database, deployment_id: str) -> dict[str, Any]:
    with db.session() as session:
        d = session.get(Deployment, deployment_id)
        assert d is not None
        return {"state": d.state, "reason": d.reason, "p50_ms": d.p50_ms, "p95_ms": d.p95_ms, "accuracy": d.accuracy}


def count(db: Database, table: type[Any]) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


# -- events -----------------------------------------------------------------------------


def test_a_new_deployment_is_pending(fleet: Fleet) -> None:
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "pending"


def test_events_move_the_deployment_through_its_states(fleet: Fleet) -> None:
    progress = [UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGED, UpdateState.TRIAL]
    for seq, state in enumerate(progress, start=1):
        apply(fleet.db, event(fleet.cam, fleet.deployment, state, seq))
        assert deployment_row(fleet.db, fleet.deployment)["state"] == state.value

    apply(fleet.db, event(fleet.cam, fleet.deployment, UpdateState.COMMITTED, 5, reason="gates passed"))

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["state"], row["reason"]) == ("committed", "gates passed")
    assert count(fleet.db, EventRecord) == 5
    assert deployment_row(fleet.db, fleet.other_deployment)["state"] == "pending"  # the other device is untouched


def test_a_failure_event_records_its_reason(fleet: Fleet) -> None:
    apply(fleet.db, event(fleet.cam, fleet.deployment, UpdateState.ROLLED_BACK, 1, reason="accuracy 0.61 < gate 0.96"))

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["state"], row["reason"]) == ("rolled_back", "accuracy 0.61 < gate 0.96")


def test_a_duplicate_event_is_stored_once(fleet: Fleet) -> None:
    message = event(fleet.cam, fleet.deployment, UpdateState.DOWNLOADING, 7)
    apply(fleet.db, message, message)
    with fleet.db.session() as session:  # a QoS 1 redelivery within one batch, too
        apply_event(session, message)
        apply_event(session, message)

    assert count(fleet.db, EventRecord) == 1
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "downloading"


def test_a_repeated_seq_with_other_content_is_still_a_duplicate(fleet: Fleet) -> None:
    apply(
        fleet.db,
        event(fleet.cam, fleet.deployment, UpdateState.TRIAL, 3),
        event(fleet.cam, fleet.deployment, UpdateState.FAILED, 3, reason="same (device, boot, seq)"),
    )

    assert count(fleet.db, EventRecord) == 1
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "trial"


def test_the_same_seq_after_a_reboot_is_a_new_event(fleet: Fleet) -> None:
    apply(
        fleet.db,
        event(fleet.cam, fleet.deployment, UpdateState.DOWNLOADING, 1, boot="boot-1"),
        event(fleet.cam, fleet.deployment, UpdateState.TRIAL, 1, boot="boot-2"),
    )

    assert count(fleet.db, EventRecord) == 2
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "trial"


@pytest.mark.parametrize("final", [UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.FAILED])
@pytest.mark.parametrize("late", [UpdateState.DOWNLOADING, UpdateState.STAGED, UpdateState.TRIAL])
def test_a_late_progress_event_never_reopens_a_settled_deployment(
    fleet: Fleet, final: UpdateState, late: UpdateState
) -> None:
    apply(
        fleet.db,
        event(fleet.cam, fleet.deployment, final, 5, reason="settled"),
        event(fleet.cam, fleet.deployment, late, 4, reason="delayed by QoS 1"),  # older, delivered late
        event(fleet.cam, fleet.deployment, late, 6, reason="stray"),  # or out of order with a higher seq
    )

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["state"], row["reason"]) == (final.value, "settled")
    assert count(fleet.db, EventRecord) == 3  # the late events are kept in the log all the same


def test_an_event_for_another_devices_deployment_is_ignored(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.ingest"):
        apply(fleet.db, event(fleet.other, fleet.deployment, UpdateState.COMMITTED, 1))

    assert deployment_row(fleet.db, fleet.deployment)["state"] == "pending"
    assert any(fleet.deployment in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_an_event_for_an_unknown_deployment_is_logged_and_kept(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.ingest"):
        apply(fleet.db, event(fleet.cam, "dep-000000000000", UpdateState.FAILED, 1))

    assert "dep-000000000000" in caplog.text
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "pending"


# -- telemetry -------------------------------------------------------------------------


def test_telemetry_updates_the_deployments_metrics(fleet: Fleet) -> None:
    apply(fleet.db, telemetry(fleet.cam, fleet.deployment, 1, p50_ms=0.25, p95_ms=0.4, accuracy=0.97))

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["p50_ms"], row["p95_ms"], row["accuracy"]) == (0.25, 0.4, 0.97)
    with fleet.db.session() as session:
        record = session.scalars(select(TelemetryRecord)).one()
        assert (record.device_id, record.boot_id, record.seq, record.kind) == (fleet.cam, BOOT, 1, "trial")
        assert (record.p50_ms, record.p95_ms, record.accuracy) == (0.25, 0.4, 0.97)
        assert record.body["benchmark"]["runs"] == 50  # the whole message is kept


def test_newer_telemetry_replaces_the_metrics(fleet: Fleet) -> None:
    apply(
        fleet.db,
        telemetry(fleet.cam, fleet.deployment, 1, p50_ms=0.25, p95_ms=0.4, accuracy=0.97),
        telemetry(fleet.cam, fleet.deployment, 2, p50_ms=0.2, p95_ms=0.3, accuracy=0.98),
    )

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["p50_ms"], row["p95_ms"], row["accuracy"]) == (0.2, 0.3, 0.98)
    assert count(fleet.db, TelemetryRecord) == 2


def test_duplicate_telemetry_is_stored_once(fleet: Fleet) -> None:
    message = telemetry(fleet.cam, fleet.deployment, 9)
    apply(fleet.db, message, message)
    with fleet.db.session() as session:
        apply_telemetry(session, message)
        apply_telemetry(session, message)

    assert count(fleet.db, TelemetryRecord) == 1


def test_a_duplicate_telemetry_seq_does_not_overwrite_the_metrics(fleet: Fleet) -> None:
    apply(
        fleet.db,
        telemetry(fleet.cam, fleet.deployment, 4, p50_ms=0.25, p95_ms=0.4, accuracy=0.97),
        telemetry(fleet.cam, fleet.deployment, 4, p50_ms=9.0, p95_ms=9.0, accuracy=0.1),
    )

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["p50_ms"], row["p95_ms"], row["accuracy"]) == (0.25, 0.4, 0.97)


def test_telemetry_for_another_devices_deployment_is_ignored(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.ingest"):
        apply(fleet.db, telemetry(fleet.other, fleet.deployment, 1, p50_ms=99.0, p95_ms=99.0, accuracy=0.0))

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["p50_ms"], row["p95_ms"], row["accuracy"]) == (None, None, None)
    assert fleet.deployment in caplog.text


def test_telemetry_without_a_deployment_is_stored_only(fleet: Fleet) -> None:
    apply(fleet.db, telemetry(fleet.cam, None, 1))

    assert count(fleet.db, TelemetryRecord) == 1
    assert deployment_row(fleet.db, fleet.deployment)["p50_ms"] is None


# -- device state and availability -------------------------------------------------------


def test_device_state_updates_the_device(fleet: Fleet) -> None:
    active = ActiveModel(model="digits", version=1, sha256="ab" * 32, quantization="dynamic_range",
                         deployment_id=fleet.deployment)
    with fleet.db.session() as session:
        device = apply_state(session, device_state(fleet.cam, active=active, update_state="idle"))
        assert device is not None and device.id == fleet.cam

    with fleet.db.session() as session:
        device = session.get(Device, fleet.cam)
        assert device is not None
        assert device.online is True
        assert device.last_seen is not None
        assert (device.boot_id, device.runtime, device.update_state) == (BOOT, "ai_edge_litert 1.2.0", "idle")
        assert (device.active_model, device.active_version, device.active_quantization, device.active_deployment_id) == (
            "digits", 1, "dynamic_range", fleet.deployment,
        )


def test_device_state_without_an_active_model_clears_it(fleet: Fleet) -> None:
    active = ActiveModel(model="digits", version=1, sha256="ab" * 32, quantization="int8", deployment_id=fleet.deployment)
    with fleet.db.session() as session:
        apply_state(session, device_state(fleet.cam, active=active))
    with fleet.db.session() as session:
        apply_state(session, device_state(fleet.cam, active=None, update_state="downloading"))

    with fleet.db.session() as session:
        device = session.get(Device, fleet.cam)
        assert device is not None
        assert (device.active_model, device.active_version, device.active_deployment_id) == (None, None, None)
        assert device.update_state == "downloading"


def test_availability_sets_online_and_offline(fleet: Fleet) -> None:
    for online in (True, False):
        with fleet.db.session() as session:
            apply_availability(session, fleet.cam, Availability(v=PROTOCOL_VERSION, online=online, boot_id=BOOT))
        with fleet.db.session() as session:
            device = session.get(Device, fleet.cam)
            assert device is not None
            assert device.online is online
            assert device.last_seen is not None


# -- unknown devices ----------------------------------------------------------------------


def test_reports_from_an_unknown_device_are_dropped_with_a_warning(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    ghost = "d-0000000000"
    with caplog.at_level(logging.WARNING, logger="server.ingest"), fleet.db.session() as session:
        apply_event(session, event(ghost, fleet.deployment, UpdateState.COMMITTED, 1))
        apply_telemetry(session, telemetry(ghost, fleet.deployment, 1))
        assert apply_state(session, device_state(ghost, active=None)) is None
        apply_availability(session, ghost, Availability(v=PROTOCOL_VERSION, online=True))

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "server.ingest"]
    assert len(warnings) == 4
    assert all(ghost in r.getMessage() for r in warnings)
    assert count(fleet.db, EventRecord) == 0
    assert count(fleet.db, TelemetryRecord) == 0
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "pending"
    with fleet.db.session() as session:
        assert session.get(Device, ghost) is None


# -- property: any order of (duplicate, late) events ----------------------------------------

_STATES = list(UpdateState)
_ORDER = [UpdateState.PENDING, UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGED, UpdateState.TRIAL]


def _after(current: UpdateState, reported: UpdateState) -> UpdateState:
    """The model of the rule: forward only, and a final state is never left (not even for another)."""
    if current.is_final:
        return current
    if reported.is_final or _ORDER.index(reported) > _ORDER.index(current):
        return reported
    return current


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(_STATES)), min_size=1, max_size=12))
def test_any_event_sequence_is_idempotent_and_final_states_stick(
    workspace: Workspace, events: list[tuple[int, UpdateState]]
) -> None:
    # One workspace serves every example: each example gets a device and deployment of its own.
    name = f"prop-{count(workspace.db, Device)}"
    device_id = register_device(workspace.db, name, "x86-64").id
    _, deployments = _rollout_to(workspace, name)
    deployment_id = deployments[device_id]

    seen: set[int] = set()
    expected = UpdateState.PENDING
    for seq, state in events:
        apply(workspace.db, event(device_id, deployment_id, state, seq))
        if seq not in seen:
            seen.add(seq)
            expected = _after(expected, state)
        actual = deployment_row(workspace.db, deployment_id)["state"]
        assert actual == expected.value
    with workspace.db.session() as session:
        stored = session.scalar(select(func.count()).where(EventRecord.device_id == device_id))
    assert stored == len(seen)


# -- runtimes that cannot load a variant ------------------------------------------------------


def test_a_load_error_is_remembered_and_later_rollouts_to_that_runtime_warn(
    workspace: Workspace, fleet: Fleet
) -> None:
    # one report only warns; the confirmation rule has its own tests in test_load_errors.py
    from server.db.models import LoadErrorRecord

    with fleet.db.session() as session:  # the cameras report different runtimes
        apply_state(session, replace_runtime(device_state(fleet.cam, active=None), "tflite-runtime", "2.14.0"))
        apply_state(session, replace_runtime(device_state(fleet.other, active=None), "ai-edge-litert", "2.3.0"))
    reason = "load_error: tflite-runtime 2.14.0 cannot load model.tflite: FULLY_CONNECTED version 12"
    apply(fleet.db, event(fleet.cam, fleet.deployment, UpdateState.ROLLED_BACK, 1, reason=reason))
    assert count(fleet.db, LoadErrorRecord) == 1

    warnings: list[str] = []
    start_rollout(workspace.db, workspace.blobs, workspace.keys(), "digits", Selection(devices=("cam-1",)),
                  ALL_AT_ONCE, warn=warnings.append)
    assert len(warnings) == 1 and "on tflite-runtime 2.14.0 although cam-1 reported" in warnings[0]
    # the other runtime gets it without a word
    start_rollout(workspace.db, workspace.blobs, workspace.keys(), "digits", Selection(devices=("cam-2",)),
                  ALL_AT_ONCE, warn=warnings.append)
    assert len(warnings) == 1
    # and a second report of the same deployment's failure adds nothing
    apply(fleet.db, event(fleet.cam, fleet.deployment, UpdateState.ROLLED_BACK, 2, reason=reason))
    assert count(fleet.db, LoadErrorRecord) == 1


def replace_runtime(state: DeviceState, name: str, version: str) -> DeviceState:
    from dataclasses import replace

    return replace(state, runtime=name, runtime_version=version)


# -- no report moves a deployment out of a final state ------------------------------------------


@pytest.mark.parametrize("final", [UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.FAILED])
def test_no_report_moves_a_deployment_out_of_a_final_state(fleet: Fleet, final: UpdateState) -> None:
    apply(fleet.db, event(fleet.cam, fleet.deployment, final, 1, reason="as it ended"))
    later = [
        event(fleet.cam, fleet.deployment, state, seq, reason="late, replayed or forged")
        for seq, state in enumerate(UpdateState, start=2)
    ]
    apply(fleet.db, *later)
    with fleet.db.session() as session:  # nor the device's own state, claiming another ending
        apply_state(session, replace(
            device_state(fleet.cam, active=None),
            outcome=DeploymentOutcome(fleet.deployment, "failed" if final is not UpdateState.FAILED else "committed"),
        ))

    row = deployment_row(fleet.db, fleet.deployment)
    assert (row["state"], row["reason"]) == (final.value, "as it ended")
    assert count(fleet.db, EventRecord) == 1 + len(later)  # every report is kept in the log all the same


def test_a_rejection_never_settles_the_deployment_it_claims(fleet: Fleet) -> None:
    apply(fleet.db, event(fleet.cam, fleet.deployment, UpdateState.COMMITTED, 1))
    rejection = Event(
        v=PROTOCOL_VERSION, device_id=fleet.cam, boot_id=BOOT, seq=2, deployment_id=fleet.deployment,
        state=REJECTED, reason="rejected: directive sequence 1 was already used", ts=NOW,
    )
    apply(fleet.db, rejection)
    apply(fleet.db, replace(rejection, seq=3, deployment_id=fleet.other_deployment))  # an open one: untouched too
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "committed"
    assert deployment_row(fleet.db, fleet.other_deployment)["state"] == "pending"
    with fleet.db.session() as session:
        stored = session.scalars(select(EventRecord.state).where(EventRecord.seq > 1)).all()
    assert stored == ["rejected", "rejected"]


# -- the device's own state settles what a lost event did not ---------------------------------


def settle_from_state(fleet: Fleet, state: DeviceState) -> dict[str, Any]:
    with fleet.db.session() as session:
        apply_state(session, state)
    return deployment_row(fleet.db, fleet.deployment)


@pytest.mark.parametrize("final", ["committed", "rolled_back", "failed"])
def test_an_open_deployment_is_settled_by_the_outcome_in_the_device_state(fleet: Fleet, final: str) -> None:
    apply(fleet.db, event(fleet.cam, fleet.deployment, UpdateState.DOWNLOADING, 1))  # then the events were lost
    row = settle_from_state(fleet, replace(
        device_state(fleet.cam, active=None),
        outcome=DeploymentOutcome(fleet.deployment, final, "accuracy 0.61 below the gate 0.96"),
    ))
    assert (row["state"], row["reason"]) == (final, "accuracy 0.61 below the gate 0.96")
    assert deployment_row(fleet.db, fleet.other_deployment)["state"] == "pending"


def test_an_open_deployment_whose_model_is_active_is_committed(fleet: Fleet) -> None:
    active = ActiveModel(model="digits", version=1, sha256="ab" * 32, quantization="int8",
                         deployment_id=fleet.deployment)
    assert settle_from_state(fleet, device_state(fleet.cam, active=active, hello=True))["state"] == "committed"


def test_a_state_about_other_deployments_settles_nothing(fleet: Fleet) -> None:
    active = ActiveModel(model="digits", version=1, sha256="ab" * 32, quantization="int8", deployment_id="dep-old")
    row = settle_from_state(fleet, replace(
        device_state(fleet.cam, active=active, update_state="downloading"),
        outcome=DeploymentOutcome("dep-old", "committed"),
    ))
    assert row["state"] == "pending"  # in-flight progress is the events' job; only an ending settles


def test_a_state_past_an_open_deployment_settles_it_as_superseded(fleet: Fleet) -> None:
    """The device took a newer directive without a word about this one (never saw it, or the word was lost)."""
    with fleet.db.session() as session:
        seq = session.get(Deployment, fleet.deployment).seq  # type: ignore[union-attr]
    row = settle_from_state(fleet, replace(device_state(fleet.cam, active=None), directive_seq=seq + 1))
    assert (row["state"], row["reason"]) == ("failed", "superseded by a newer rollout")
    assert settle_from_state(fleet, replace(  # and the device's own late word still replaces the guess
        device_state(fleet.cam, active=None), directive_seq=seq + 1,
        outcome=DeploymentOutcome(fleet.deployment, "committed"),
    ))["state"] == "committed"


def test_a_deployment_a_report_ended_earlier_in_the_same_batch_is_not_taken_as_superseded(fleet: Fleet) -> None:
    """settle_superseded reads the open deployments without flushing the batch first: the one an earlier
    report of the batch just committed still reads as open in the database, and must stay committed."""
    with fleet.db.session() as session:
        for seq, state in enumerate((UpdateState.DOWNLOADING, UpdateState.TRIAL, UpdateState.COMMITTED), start=1):
            apply_event(session, event(fleet.cam, fleet.deployment, state, seq))
        device = session.get(Device, fleet.cam)
        assert device is not None
        settle_superseded(session, device, seq=2)  # the device has taken a newer directive since
        apply_event(session, event(fleet.other, fleet.other_deployment, UpdateState.DOWNLOADING, 1))
        other = session.get(Device, fleet.other)
        assert other is not None
        settle_superseded(session, other, seq=2)
    assert deployment_row(fleet.db, fleet.deployment)["state"] == "committed"
    assert (deployment_row(fleet.db, fleet.other_deployment)["state"], deployment_row(
        fleet.db, fleet.other_deployment)["reason"]) == ("failed", SUPERSEDED)
