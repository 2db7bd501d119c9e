"""Removing a device with deployments: they end as ``removed``, nothing is sent to it or taken from it any more,
and its history still names it. Also: the VARIANT that ``device list`` shows for an active model.

Every test works in a copy of the data directory with ``digits:1`` built (``conftest.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select

from server.db import queries
from server.db.models import Artifact, AuditEvent, Deployment, Device, EventRecord, TelemetryRecord, Variant
from server.devices import list_devices, register_device, remove_device
from server.ingest import apply_availability, apply_event, apply_state, apply_telemetry
from server.rollouts import RolloutEngine, RolloutPolicy, rollout_status, start_rollout
from server.selection import Selection, select_devices
from server.setup import Workspace
from shared import PROTOCOL_VERSION
from shared.messages import ActiveModel, Availability, UpdateState
from tests.server.rollout_helpers import start_all_at_once, take_up
from tests.server.test_cli_errors import assert_ok, run
from tests.server.test_unit_engine import Recorder
from tests.server.test_unit_ingest import device_state, event, telemetry


def deployments(workspace: Workspace, rollout_id: str) -> dict[str, Deployment]:
    """{device name: deployment}."""
    with workspace.db.session() as session:
        rows = session.scalars(select(Deployment).where(Deployment.rollout_id == rollout_id)).all()
        return {d.device.name: d for d in rows}


@pytest.fixture
def two_cams(workspace: Workspace) -> dict[str, str]:
    """cam-1 and cam-2 (x86-64), one rollout of digits to both: {name: device id}."""
    return {name: register_device(workspace.db, name, "x86-64", [("site", "lab")]).id for name in ("cam-1", "cam-2")}


def test_removal_settles_open_deployments_and_keeps_history(workspace: Workspace, two_cams: dict[str, str]) -> None:
    rollout_id = start_all_at_once(workspace, "cam-1", "cam-2")
    cam1 = deployments(workspace, rollout_id)["cam-1"]
    with workspace.db.session() as session:
        apply_event(session, event(two_cams["cam-1"], cam1.id, UpdateState.DOWNLOADING, 1))

    removed = remove_device(workspace.db, "cam-1", actor="operator test@host")

    assert removed.settled == (cam1.id,)
    after = deployments(workspace, rollout_id)
    assert (after["cam-1"].state, after["cam-1"].reason) == ("removed", "device removed")
    assert after["cam-2"].state == "pending"  # another device's work is untouched
    assert "removed" in queries.FINAL_STATES and "cancelled" in queries.FINAL_STATES
    status = rollout_status(workspace.db, rollout_id)  # the history still names the removed device
    assert {d.device: d.state for d in status.devices} == {"cam-1": "removed", "cam-2": "pending"}
    with workspace.db.session() as session:
        entries = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        settled, gone = entries[-2:]
        assert (settled.kind, settled.rollout_id, settled.data["previous_state"]) == (
            "deployment.removed", rollout_id, "downloading")
        assert (gone.kind, gone.actor, gone.data["settled_deployments"]) == (
            "device.removed", "operator test@host", [cam1.id])


def test_a_settled_deployment_is_not_touched_again(workspace: Workspace, two_cams: dict[str, str]) -> None:
    rollout_id = start_all_at_once(workspace, "cam-1")
    dep = deployments(workspace, rollout_id)["cam-1"]
    with workspace.db.session() as session:
        apply_event(session, event(two_cams["cam-1"], dep.id, UpdateState.COMMITTED, 1))

    assert remove_device(workspace.db, "cam-1").settled == ()
    assert deployments(workspace, rollout_id)["cam-1"].state == "committed"


def test_nothing_is_published_to_a_removed_device(workspace: Workspace, two_cams: dict[str, str]) -> None:
    rollout_id = start_all_at_once(workspace, "cam-1", "cam-2")
    remove_device(workspace.db, "cam-1")
    recorder = Recorder()

    RolloutEngine(workspace.db, workspace.keys(), recorder).tick(1_700_000_000.0)

    assert [topic for topic, _, _ in recorder.calls] == [f"ef/v1/devices/{two_cams['cam-2']}/desired"]
    assert deployments(workspace, rollout_id)["cam-1"].published_at is None


def test_reports_from_a_removed_device_are_dropped(
    workspace: Workspace, two_cams: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    rollout_id = start_all_at_once(workspace, "cam-1")
    dep = deployments(workspace, rollout_id)["cam-1"]
    remove_device(workspace.db, "cam-1")
    cam = two_cams["cam-1"]
    active = ActiveModel(model="digits", version=1, sha256="ab" * 32, quantization="dynamic_range",
                         deployment_id=dep.id)

    with caplog.at_level(logging.WARNING, logger="server.ingest"), workspace.db.session() as session:
        assert apply_event(session, event(cam, dep.id, UpdateState.COMMITTED, 1)) is False
        assert apply_telemetry(session, telemetry(cam, dep.id, 2)) is False
        assert apply_state(session, device_state(cam, active=active)) is None
        apply_availability(session, cam, Availability(v=PROTOCOL_VERSION, online=True))

    warnings = [r.getMessage() for r in caplog.records if r.name == "server.ingest"]
    assert len(warnings) == 4 and all("unknown or removed device" in w and cam in w for w in warnings)
    with workspace.db.session() as session:
        assert session.scalar(select(func.count()).select_from(EventRecord)) == 0
        assert session.scalar(select(func.count()).select_from(TelemetryRecord)) == 0
        device = session.get(Device, cam)
        assert device is not None and device.online is False and device.active_model is None
    assert deployments(workspace, rollout_id)["cam-1"].state == "removed"


def test_lookups_leave_removed_devices_out(workspace: Workspace, two_cams: dict[str, str]) -> None:
    remove_device(workspace.db, "cam-1")
    replacement = register_device(workspace.db, "cam-1", "rpi4")  # the freed name, on a new device
    with workspace.db.session() as session:
        assert [d.name for d in queries.devices(session)] == ["cam-1", "cam-2"]
        assert [d.id for d in queries.devices(session)] == [replacement.id, two_cams["cam-2"]]
        found = queries.device_by_name(session, "cam-1")
        assert found is not None and found.id == replacement.id
        assert [d.name for d in queries.devices_with_profile(session, "x86-64")] == ["cam-2"]
        assert queries.live_device(session, two_cams["cam-1"]) is None
        assert queries.live_device(session, replacement.id) is not None
        held = select_devices(session, Selection(tags=(("site", "lab"),), devices=("cam-1",)))
        assert [d.id for d in held] == [replacement.id, two_cams["cam-2"]]
    assert [d.name for d in list_devices(workspace.db, Selection(profiles=("x86-64",)))] == ["cam-2"]


def test_a_rollout_cannot_target_a_removed_device(workspace: Workspace, two_cams: dict[str, str]) -> None:
    remove_device(workspace.db, "cam-1")
    result = run("rollout", "start", "digits", "--device", "cam-1", "--data-dir", workspace.data_dir.root)
    assert result.exit_code == 1 and "unknown device 'cam-1'" in result.stderr
    rollout_id = start_rollout(workspace.db, workspace.blobs, workspace.keys(), "digits",
                               Selection(profiles=("x86-64",)), RolloutPolicy(waves=("100%",)))
    take_up(workspace)
    assert set(deployments(workspace, rollout_id)) == {"cam-2"}


# -- the VARIANT column ----------------------------------------------------------------------------------------


def _activate(workspace: Workspace, device_id: str, deployment_id: str, quantization: str) -> None:
    active = ActiveModel(model="digits", version=1, sha256="ab" * 32, quantization=quantization,
                         deployment_id=deployment_id)
    with workspace.db.session() as session:
        apply_state(session, device_state(device_id, active=active))


def _variant_column(data_dir: Path) -> dict[str, str]:
    lines = assert_ok(run("device", "list", "--data-dir", data_dir)).splitlines()
    header = lines[0]
    return {line.split()[0]: line[header.index("VARIANT"):].strip() for line in lines[2:]}


def test_variant_shows_the_recipe_that_shipped(workspace: Workspace, two_cams: dict[str, str]) -> None:
    # as if x86-64 shipped a pruned int8 build (building one for real retrains the model: see test_build_report)
    with workspace.db.session() as session:
        artifact = session.scalars(select(Artifact).where(Artifact.profile_name == "x86-64")).one()
        artifact.recipe = "prune:0.5+int8"
    rollout_id = start_all_at_once(workspace, "cam-1")
    _activate(workspace, two_cams["cam-1"], deployments(workspace, rollout_id)["cam-1"].id, "int8")
    _activate(workspace, two_cams["cam-2"], "dep-from-elsewhere", "float16")  # a deployment this server never made

    data_dir = workspace.data_dir.root
    assert _variant_column(data_dir) == {"cam-1": "prune:0.5+int8", "cam-2": "float16"}
    listed = {d["name"]: d for d in json.loads(assert_ok(run("device", "list", "--data-dir", data_dir, "--json")))}
    assert (listed["cam-1"]["active_recipe"], listed["cam-1"]["active_quantization"]) == ("prune:0.5+int8", "int8")
    assert (listed["cam-2"]["active_recipe"], listed["cam-2"]["active_quantization"]) == (None, "float16")

    # the profile rebuilt since: the shipped file's recipe comes from the report row with its digest
    with workspace.db.session() as session:
        artifact = session.scalars(select(Artifact).where(Artifact.profile_name == "x86-64")).one()
        shipped, artifact.sha256, artifact.recipe = artifact.sha256, "0" * 64, "float32"
        row = session.scalars(select(Variant).where(Variant.sha256 == shipped, Variant.profile_name == "x86-64")).one()
        row.recipe = "lowrank:0.9+dynamic_range"
    assert _variant_column(data_dir)["cam-1"] == "lowrank:0.9+dynamic_range"
    with workspace.db.session() as session:  # and with neither: what the device said
        row = session.scalars(select(Variant).where(Variant.sha256 == shipped, Variant.profile_name == "x86-64")).one()
        session.delete(row)
    assert _variant_column(data_dir)["cam-1"] == "int8"


def test_variant_ignores_another_devices_deployment(workspace: Workspace, two_cams: dict[str, str]) -> None:
    rollout_id = start_all_at_once(workspace, "cam-1")
    _activate(workspace, two_cams["cam-2"], deployments(workspace, rollout_id)["cam-1"].id, "float16")
    assert _variant_column(workspace.data_dir.root)["cam-2"] == "float16"
