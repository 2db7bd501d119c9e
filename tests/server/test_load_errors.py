"""The load-error confirmation rule: one device's report warns, a confirmed one blocks, the operator may override.

Every test works in its own copy of a data directory with ``digits:1`` built
(see ``conftest.py``): three x86-64 cameras, cam-1 and cam-2 on
tflite-runtime 2.14.0 and cam-3 on ai-edge-litert 2.3.0, all given the
dynamic_range variant by a first rollout. Reports arrive through
``server.ingest`` as the agents send them: a rolled-back event whose reason
starts with ``load_error: ``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import pytest
from alembic import command
from click.testing import Result
from sqlalchemy import inspect, select, text

from server.db import Database, _alembic_config
from server.db.models import Artifact, Deployment, Device, LoadErrorRecord, Rollout
from server.devices import register_device
from server.ingest import _remember_incompatibility, apply_state
from server.load_errors import KnownLoadErrors, LoadErrorReport
from server.rollouts import start_rollout
from server.selection import Selection
from server.setup import Workspace
from shared.errors import UserInputError
from shared.messages import UpdateState
from shared.trial import LOAD_ERROR
from tests.server.rollout_helpers import ALL_AT_ONCE, take_up
from tests.server.test_cli_errors import assert_ok, assert_user_error, run
from tests.server.test_unit_ingest import apply, count, device_state, event

OLD = "tflite-runtime 2.14.0"
NEW = "ai-edge-litert 2.3.0"
REASON = f"{LOAD_ERROR}tflite-runtime 2.14.0 cannot load model.tflite: FULLY_CONNECTED version 12"
SECOND_REASON = f"{LOAD_ERROR}tflite-runtime 2.14.0 cannot load model.tflite: Didn't find op for builtin opcode"


@dataclass
class Fleet:
    workspace: Workspace
    ids: dict[str, str]  # device name -> id
    deployments: dict[str, str]  # device name -> its deployment in the first rollout
    variant: str  # how messages name the x86-64 variant
    seq: int = 0

    @property
    def db(self) -> Database:
        return self.workspace.db

    def report(self, name: str, deployment_id: str | None = None, *, reason: str = REASON) -> None:
        """``name``'s agent reports that its trial could not load the model of ``deployment_id``."""
        self.seq += 1
        message = event(self.ids[name], deployment_id or self.deployments[name], UpdateState.ROLLED_BACK, self.seq,
                        reason=reason)
        apply(self.db, message)


def set_runtime(db: Database, device_id: str, runtime: str) -> None:
    name, version = runtime.split()
    with db.session() as session:
        apply_state(session, replace(device_state(device_id, active=None), runtime=name, runtime_version=version))


def rollout(fleet: Fleet, *names: str, **kwargs: object) -> tuple[str, list[str]]:
    """Start a rollout of digits to ``names``; returns its id and the warnings it gave."""
    warnings: list[str] = []
    rollout_id = start_rollout(fleet.db, fleet.workspace.blobs, fleet.workspace.keys(), "digits",
                               Selection(devices=names), ALL_AT_ONCE, warn=warnings.append,
                               **kwargs)  # type: ignore[arg-type]
    take_up(fleet.workspace)
    return rollout_id, warnings


def deployment_of(fleet: Fleet, rollout_id: str, name: str) -> str:
    with fleet.db.session() as session:
        return session.scalars(
            select(Deployment.id).where(Deployment.rollout_id == rollout_id, Deployment.device_id == fleet.ids[name])
        ).one()


def records(db: Database) -> list[tuple[str, str, str | None, str]]:
    """(runtime, device id, deployment id, reason) of every stored report, oldest first."""
    with db.session() as session:
        rows = session.scalars(select(LoadErrorRecord).order_by(LoadErrorRecord.id)).all()
        return [(r.runtime, r.device_id, r.deployment_id, r.reason) for r in rows]


@pytest.fixture
def fleet(workspace: Workspace) -> Fleet:
    ids = {name: register_device(workspace.db, name, "x86-64").id for name in ("cam-1", "cam-2", "cam-3")}
    for name, runtime in (("cam-1", OLD), ("cam-2", OLD), ("cam-3", NEW)):
        set_runtime(workspace.db, ids[name], runtime)
    with workspace.db.session() as session:
        sha256 = session.scalars(select(Artifact.sha256).where(Artifact.profile_name == "x86-64")).one()
    fleet = Fleet(workspace, ids, {}, f"digits:1's dynamic_range variant for x86-64 ({sha256[:12]})")
    first, warnings = rollout(fleet, "cam-1", "cam-2", "cam-3")
    assert warnings == []
    fleet.deployments = {name: deployment_of(fleet, first, name) for name in ids}
    return fleet


# -- one report warns ------------------------------------------------------------------------------


def cam_1s_word_for_cam_2(fleet: Fleet) -> str:
    """The warning when cam-1 alone reported the variant that a rollout sends to cam-2."""
    return (
        f"{fleet.variant} goes to cam-2 on {OLD} although cam-1 reported that runtime could not load it "
        f"({REASON}); one report is not a confirmation, another will block later rollouts"
    )


def test_one_report_warns_naming_the_device_and_the_rollout_starts(fleet: Fleet) -> None:
    fleet.report("cam-1")

    rollout_id, warnings = rollout(fleet, "cam-2")

    assert warnings == [cam_1s_word_for_cam_2(fleet)]
    deployment_of(fleet, rollout_id, "cam-2")  # exists


def test_one_warning_per_runtime_naming_every_target_on_it(fleet: Fleet) -> None:
    fleet.report("cam-1")

    _, warnings = rollout(fleet, "cam-1", "cam-2", "cam-3")

    assert len(warnings) == 1
    assert f"goes to cam-1 and cam-2 on {OLD} although cam-1 reported" in warnings[0]


def test_a_report_on_another_runtime_says_nothing_about_this_one(fleet: Fleet) -> None:
    fleet.report("cam-1")
    fleet.report("cam-2")

    _, warnings = rollout(fleet, "cam-3")  # ai-edge-litert loads it fine, as far as anyone knows

    assert warnings == []


def test_the_default_warn_logs(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    fleet.report("cam-1")
    with caplog.at_level("WARNING", logger="server.rollouts.planning"):
        start_rollout(fleet.db, fleet.workspace.blobs, fleet.workspace.keys(), "digits", Selection(devices=("cam-2",)),
                      ALL_AT_ONCE)

    assert [r.getMessage() for r in caplog.records if r.name == "server.rollouts.planning"] == [
        cam_1s_word_for_cam_2(fleet)]


# -- two reports block -------------------------------------------------------------------------------


def refused(fleet: Fleet, *names: str) -> str:
    """Start a rollout that must be refused; returns the message, having checked nothing was created."""
    rollouts_before = count(fleet.db, Rollout)
    with fleet.db.session() as session:
        seqs_before = {d.name: d.directive_seq for d in session.scalars(select(Device))}
    warnings: list[str] = []
    with pytest.raises(UserInputError) as caught:
        start_rollout(fleet.db, fleet.workspace.blobs, fleet.workspace.keys(), "digits", Selection(devices=names),
                      ALL_AT_ONCE, warn=warnings.append)
    assert warnings == []
    assert count(fleet.db, Rollout) == rollouts_before
    with fleet.db.session() as session:
        assert {d.name: d.directive_seq for d in session.scalars(select(Device))} == seqs_before
    return str(caught.value)


def test_two_devices_confirm_it_and_the_rollout_is_refused_naming_both(fleet: Fleet) -> None:
    fleet.report("cam-1")
    fleet.report("cam-2", reason=SECOND_REASON)

    message = refused(fleet, "cam-1")

    assert message == (
        f"cam-1 runs {OLD}, which cannot load {fleet.variant}: confirmed by 2 load_error reports from cam-1 and "
        f"cam-2 (first: {REASON}); build and ship another recipe ('edgefleet model build digits:1 --profile "
        "x86-64 --recipe ... --ship'), leave that device out, or pass --ignore-load-errors to roll it out anyway"
    )


def test_a_confirmed_runtime_refuses_the_whole_rollout_naming_its_devices(fleet: Fleet) -> None:
    fleet.report("cam-1")
    fleet.report("cam-2")

    message = refused(fleet, "cam-1", "cam-2", "cam-3")

    assert message.startswith(f"cam-1 and cam-2 run {OLD}, which cannot load {fleet.variant}: confirmed by 2 ")
    assert "leave those devices out" in message


def test_the_same_device_on_two_deployments_confirms_it(fleet: Fleet) -> None:
    fleet.report("cam-1")
    second, warnings = rollout(fleet, "cam-1")  # one report: it may try again
    assert len(warnings) == 1
    fleet.report("cam-1", deployment_id=deployment_of(fleet, second, "cam-1"), reason=SECOND_REASON)

    message = refused(fleet, "cam-2")

    assert "confirmed by 2 load_error reports from cam-1 (2 times) (first: " in message
    assert message.startswith(f"cam-2 runs {OLD}, which cannot load {fleet.variant}")


def test_the_same_deployment_reported_twice_is_one_report(fleet: Fleet) -> None:
    fleet.report("cam-1")
    fleet.report("cam-1")  # a second event on the same deployment (another seq)
    duplicate = event(fleet.ids["cam-1"], fleet.deployments["cam-1"], UpdateState.ROLLED_BACK, 1, reason=REASON)
    apply(fleet.db, duplicate)  # a QoS 1 redelivery of the first
    with fleet.db.session() as session:  # the same outcome seen again, e.g. while reconciling the device's state
        device = session.get(Device, fleet.ids["cam-1"])
        deployment = session.get(Deployment, fleet.deployments["cam-1"])
        assert device is not None and deployment is not None
        _remember_incompatibility(session, device, deployment, REASON)
        _remember_incompatibility(session, device, deployment, REASON)

    assert records(fleet.db) == [(OLD, fleet.ids["cam-1"], fleet.deployments["cam-1"], REASON)]
    _, warnings = rollout(fleet, "cam-2")  # still unconfirmed
    assert len(warnings) == 1 and "although cam-1 reported" in warnings[0]


def test_a_device_without_a_known_runtime_records_nothing(fleet: Fleet) -> None:
    with fleet.db.session() as session:
        device = session.get(Device, fleet.ids["cam-1"])
        deployment = session.get(Deployment, fleet.deployments["cam-1"])
        assert device is not None and deployment is not None
        device.runtime = None
        _remember_incompatibility(session, device, deployment, REASON)

    assert records(fleet.db) == []


# -- the operator's override ---------------------------------------------------------------------------


def test_the_override_proceeds_and_still_warns(fleet: Fleet) -> None:
    fleet.report("cam-1")
    fleet.report("cam-2")

    rollout_id, warnings = rollout(fleet, "cam-1", "cam-3", ignore_load_errors=True)

    assert warnings == [
        (f"--ignore-load-errors: {fleet.variant} goes to cam-1 on {OLD} although 2 load_error reports from cam-1 "
         f"and cam-2 say that runtime cannot load it (first: {REASON})")
    ]
    deployment_of(fleet, rollout_id, "cam-1")
    deployment_of(fleet, rollout_id, "cam-3")


def test_the_override_changes_nothing_for_an_unconfirmed_report(fleet: Fleet) -> None:
    fleet.report("cam-1")

    assert rollout(fleet, "cam-2", ignore_load_errors=True)[1] == rollout(fleet, "cam-2")[1]


# -- the rule on its own ----------------------------------------------------------------------------------


def _report(device: str, deployment_id: str | None) -> LoadErrorReport:
    return LoadErrorReport("ab" * 32, OLD, device, deployment_id, REASON, datetime(2026, 11, 24, tzinfo=timezone.utc))


@pytest.mark.parametrize(
    ("reports", "confirmed", "reporters"),
    [
        ([("cam-1", "dep-1")], False, "cam-1"),
        ([("cam-1", "dep-1"), ("cam-2", "dep-2")], True, "cam-1 and cam-2"),
        ([("cam-1", "dep-1"), ("cam-1", "dep-2")], True, "cam-1 (2 times)"),
        ([("cam-2", "dep-1"), ("cam-1", "dep-2"), ("cam-2", "dep-3")], True, "cam-2 (2 times) and cam-1"),
        ([("cam-1", None)], False, "cam-1"),  # migrated from before reports were kept per deployment
    ],
)
def test_a_pair_is_confirmed_by_two_reports(
    reports: list[tuple[str, str | None]], confirmed: bool, reporters: str
) -> None:
    known = KnownLoadErrors("ab" * 32, OLD, tuple(_report(*r) for r in reports))
    assert (known.confirmed, known.reporters()) == (confirmed, reporters)


# -- the CLI -------------------------------------------------------------------------------------------------


def cli_start(fleet: Fleet, *args: str) -> Result:
    return run("rollout", "start", "digits", *args, "--data-dir", fleet.workspace.data_dir.root)


def test_cli_refusal_is_one_error_line(fleet: Fleet) -> None:
    fleet.report("cam-1")
    fleet.report("cam-2")

    assert_user_error(cli_start(fleet, "--device", "cam-1"),
                      f"cam-1 runs {OLD}, which cannot load {fleet.variant}", "from cam-1 and cam-2",
                      "--ignore-load-errors")
    assert count(fleet.db, Rollout) == 1


@pytest.mark.parametrize(("reporters", "flags", "warning"), [
    (["cam-1"], [], "although cam-1 reported that runtime could not load it"),
    (["cam-1", "cam-2"], ["--ignore-load-errors"], "--ignore-load-errors: "),
], ids=["unconfirmed", "override"])
def test_cli_prints_only_the_rollout_id_on_stdout_and_warnings_on_stderr(
    fleet: Fleet, reporters: list[str], flags: list[str], warning: str
) -> None:
    for name in reporters:
        fleet.report(name)

    result = cli_start(fleet, "--device", "cam-1", *flags)

    rollout_id = assert_ok(result).strip()
    assert rollout_id.startswith("r-") and "\n" not in rollout_id
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("warning: ") and warning in line, line
    take_up(fleet.workspace)
    deployment_of(fleet, rollout_id, "cam-1")


# -- model report ------------------------------------------------------------------------------------------


def test_model_report_lists_who_reported_which_variant(fleet: Fleet) -> None:
    fleet.report("cam-1")
    second, _ = rollout(fleet, "cam-1")
    fleet.report("cam-1", deployment_id=deployment_of(fleet, second, "cam-1"), reason=SECOND_REASON)
    data_dir = fleet.workspace.data_dir.root

    [report] = json.loads(assert_ok(run("model", "report", "digits", "--profile", "x86-64", "--data-dir", data_dir,
                                        "--json")))
    [variant] = report["variants"]
    errors = variant["load_errors"]
    for error in errors:
        assert datetime.fromisoformat(error.pop("reported_at")).tzinfo is not None
    assert errors == [
        {"runtime": OLD, "device": "cam-1", "deployment": fleet.deployments["cam-1"], "reason": REASON,
         "confirmed": True},
        {"runtime": OLD, "device": "cam-1", "deployment": deployment_of(fleet, second, "cam-1"),
         "reason": SECOND_REASON, "confirmed": True},
    ]

    table = assert_ok(run("model", "report", "digits", "--profile", "x86-64", "--data-dir", data_dir))
    section = table.split("load errors reported by devices")[1].splitlines()
    rows = [line.split() for line in section[3:]]
    assert [(r[0], " ".join(r[1:3]), r[3], r[4], r[5]) for r in rows] == [
        ("dynamic_range", OLD, "confirmed", "cam-1", fleet.deployments["cam-1"]),
        ("dynamic_range", OLD, "confirmed", "cam-1", deployment_of(fleet, second, "cam-1")),
    ]


def test_model_report_without_load_errors_has_no_such_section(fleet: Fleet) -> None:
    data_dir = fleet.workspace.data_dir.root
    [report] = json.loads(assert_ok(run("model", "report", "digits", "--profile", "x86-64", "--data-dir", data_dir,
                                        "--json")))
    assert [v["load_errors"] for v in report["variants"]] == [[]]
    assert "load errors" not in assert_ok(run("model", "report", "digits", "--data-dir", data_dir))


# -- migration from 0002's one-row verdicts ----------------------------------------------------------------


def migrate(db: Database, revision: str) -> None:
    """Move the schema to ``revision`` (downgrades too), as Database.upgrade runs migrations: with SQLite's
    foreign keys off, since batch migrations drop and rebuild referenced tables (0004's downgrade does)."""
    sqlite = db.engine.dialect.name == "sqlite"
    with db.engine.connect() as conn:
        if sqlite:
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                if revision == "head":
                    command.upgrade(_alembic_config(conn), revision)
                else:
                    command.downgrade(_alembic_config(conn), revision)
        finally:
            if sqlite:
                conn.invalidate()  # never hand a connection without foreign keys back to the pool


def test_upgrading_from_0002_keeps_what_runtime_incompatibilities_knew(fleet: Fleet) -> None:
    with fleet.db.session() as session:
        sha256 = session.scalars(select(Artifact.sha256).where(Artifact.profile_name == "x86-64")).one()
    migrate(fleet.db, "0002")
    with fleet.db.engine.connect() as conn, conn.begin():
        # as 0002's ingest left it: cam-1's deployment rolled back with the reason it also stored here
        conn.execute(text("UPDATE deployments SET state = 'rolled_back', reason = :reason WHERE id = :id"),
                     {"reason": REASON, "id": fleet.deployments["cam-1"]})
        conn.execute(
            text("INSERT INTO runtime_incompatibilities (model_sha256, runtime, reason, device_id, created_at) "
                 "VALUES (:sha, :runtime, :reason, :device, :at)"),
            [{"sha": sha256, "runtime": OLD, "reason": REASON, "device": fleet.ids["cam-1"],
              "at": "2026-11-23 05:40:00.000000"},
             {"sha": sha256, "runtime": "tflite-runtime 2.13.0", "reason": "load_error: gone", "device": "d-gone",
              "at": "2026-11-23 05:41:00.000000"}],
        )

    fleet.db.upgrade()

    assert "runtime_incompatibilities" not in inspect(fleet.db.engine).get_table_names()
    assert records(fleet.db) == [
        (OLD, fleet.ids["cam-1"], fleet.deployments["cam-1"], REASON),  # its deployment found again
        ("tflite-runtime 2.13.0", "d-gone", None, "load_error: gone"),  # none to find: kept without one
    ]
    _, warnings = rollout(fleet, "cam-2")  # one device's word now warns instead of blocking
    assert warnings and "although cam-1 reported that runtime could not load it" in warnings[0]
    fleet.report("cam-1")  # that deployment's outcome again: still one report
    assert len(records(fleet.db)) == 2


def test_downgrading_to_0002_keeps_the_oldest_report_of_each_pair(fleet: Fleet) -> None:
    fleet.report("cam-1")
    fleet.report("cam-2", reason=SECOND_REASON)
    fleet.report("cam-3", reason=f"{LOAD_ERROR}ai-edge-litert says no")

    migrate(fleet.db, "0002")

    with fleet.db.engine.connect() as conn:
        rows = conn.execute(text("SELECT runtime, device_id, reason FROM runtime_incompatibilities ORDER BY id"))
        assert [tuple(r) for r in rows] == [
            (OLD, fleet.ids["cam-1"], REASON), (NEW, fleet.ids["cam-3"], f"{LOAD_ERROR}ai-edge-litert says no"),
        ]
    assert "load_error_reports" not in inspect(fleet.db.engine).get_table_names()
