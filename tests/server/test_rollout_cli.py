"""The rollout and events commands as an operator types them: clear errors, tables, JSON, the audit trail."""

from __future__ import annotations

import json

import pytest

from server.devices import register_device
from server.setup import Workspace
from tests.server.rollout_helpers import take_up
from tests.server.test_cli_errors import assert_ok, assert_user_error, run


@pytest.fixture
def data(workspace: Workspace) -> str:
    for name in ("cam-1", "cam-2", "cam-3"):
        register_device(workspace.db, name, "x86-64")
    return str(workspace.data_dir.root)


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--waves", "1,0%"], ["invalid wave size '0%'"]),
    (["--waves", "x"], ["invalid wave size 'x'"]),
    (["--max-regression", "1.5"], ["--max-regression must be between 0 and 1"]),
    (["--max-latency-ratio", "0"], ["--max-latency-ratio must be positive"]),
    (["--min-reports", "-1"], ["invalid --min-reports size"]),
    (["--tag", "site"], ["site"]),
])
def test_bad_rollout_flags_are_one_clear_line(data: str, flags: list[str], fragments: list[str]) -> None:
    assert_user_error(run("rollout", "start", "digits", "--profile", "x86-64", *flags, "--data-dir", data),
                      *fragments)


def test_a_selection_nobody_matches_is_refused(data: str) -> None:
    assert_user_error(run("rollout", "start", "digits", "--profile", "rpi4", "--data-dir", data),
                      "no registered device matches")
    assert_user_error(run("rollout", "start", "digits", "--data-dir", data), "--profile, --tag or --device")


def test_start_status_list_pause_and_events(workspace: Workspace, data: str) -> None:
    rollout_id = assert_ok(run("rollout", "start", "digits", "--profile", "x86-64", "--waves", "1,50%",
                               "--on-failure", "pause", "--data-dir", data)).strip()
    take_up(workspace)

    table = assert_ok(run("rollout", "status", rollout_id, "--data-dir", data))
    assert "WAVE" in table and "LATENCY_RATIO" in table and "waiting" in table and "dynamic_range" in table
    status = json.loads(assert_ok(run("rollout", "status", rollout_id, "--json", "--data-dir", data)))
    assert [w["spec"] for w in status["waves"]] == ["1", "50%", "100%"]
    assert status["policy"]["on_failure"] == "pause"
    listed = json.loads(assert_ok(run("rollout", "list", "--json", "--data-dir", data)))
    assert [r["rollout"] for r in listed] == [rollout_id] and listed[0]["state"] == "running"

    assert "paused" in assert_ok(run("rollout", "pause", rollout_id, "--data-dir", data))
    assert_user_error(run("rollout", "pause", rollout_id, "--data-dir", data), "is paused", "cannot be paused")
    assert_user_error(run("rollout", "resume", "r-nope", "--data-dir", data), "unknown rollout 'r-nope'")

    events = json.loads(assert_ok(run("events", "--rollout", rollout_id, "--json", "--data-dir", data)))
    kinds = [e["kind"] for e in events]
    assert kinds[:3] == ["rollout.started", "wave.started", "rollout.paused"]
    assert events[0]["actor"].startswith("operator ") and events[1]["actor"] == "server"
    assert "cam-1" in events[1]["message"]
    table = assert_ok(run("events", "--rollout", rollout_id, "--data-dir", data))
    assert table.splitlines()[0].split() == ["TIME", "EVENT", "ROLLOUT", "DEVICE", "BY", "WHAT"]
    assert len(table.splitlines()) == 2 + len(events)
    assert_user_error(run("events", "--device", "nope", "--data-dir", data), "unknown device 'nope'")
