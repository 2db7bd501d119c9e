"""``edgefleet latency`` and the ``--latency-*`` flags of ``edgefleet server``; the time and duration parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgefleet.cli import cli
from server.devices import register_device
from server.latency import device_latency, series_json
from server.latency.timespec import auto_step, format_duration, parse_duration, parse_time
from server.setup import Workspace
from shared.errors import UserInputError
from tests.server.latency_helpers import ingest, serving

T0 = 1_699_999_200.0


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def served(workspace: Workspace) -> Path:
    cam = register_device(workspace.db, "cam-1", "x86-64").id
    ingest(workspace.db, *(serving(cam, seq, [1.0 + seq % 5] * 20, end=T0 + seq * 10, errors=seq % 2)
                           for seq in range(1, 30)))
    return workspace.data_dir.root


def test_json_is_exactly_the_read_models_series_json(served: Path, workspace: Workspace) -> None:
    result = run("latency", "--device", "cam-1", "--since", T0, "--until", T0 + 300, "--step", "1m", "--json",
                 "--data-dir", served)
    assert result.exit_code == 0, result.output
    expected = series_json(device_latency(workspace.db, "cam-1", since=T0, until=T0 + 300, step_s=60))
    assert json.loads(result.output) == expected
    assert sum(p["calls"] for p in expected["points"]) == 29 * 20 + 15  # samples, and the calls that failed (odd seqs)


def test_table_shows_a_row_per_step(served: Path) -> None:
    result = run("latency", "--profile", "x86-64", "--since", "2023-11-14T22:00:00Z", "--until", T0 + 300,
                 "--step", "1m", "--data-dir", served)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("profile x86-64: 2023-11-14 22:00:00 to")
    assert lines[1].split() == ["time", "calls", "p50", "ms", "p90", "ms", "p99", "ms", "errors", "source"]
    assert len([line for line in lines if line.startswith("2023-11-14 22:0")]) == 5
    assert "digits:1: 595 calls" in result.output


def test_model_scope_and_an_empty_range(served: Path) -> None:
    result = run("latency", "--model", "digits:1", "--since", "1h", "--data-dir", served)
    assert result.exit_code == 0, result.output
    assert "no serving reports in this range" in result.output


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--device", "ghost"], 1, "unknown device 'ghost'"),
    (["--profile", "toaster"], 1, "unknown profile 'toaster'"),
    (["--model", "digits:9"], 1, "no version 9"),
    ([], 2, "exactly one of --device, --profile or --model"),
    (["--device", "cam-1", "--profile", "x86-64"], 2, "exactly one of"),
    (["--model", "digits"], 2, "expected NAME:VERSION"),
    (["--device", "cam-1", "--step", "5x"], 2, "bad duration '5x'"),
    (["--device", "cam-1", "--since", "yesterday"], 2, "bad time 'yesterday'"),
    (["--device", "cam-1", "--since", "now", "--until", "1h"], 1, "must be before until"),
    (["--device", "cam-1", "--since", "30d", "--step", "1s"], 1, "more than 10000 points"),
])
def test_bad_arguments_are_one_clear_line(served: Path, args: list[str], code: int, message: str) -> None:
    result = run("latency", *args, "--data-dir", served)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # click's exit, not an error escaping


@pytest.mark.parametrize(("args", "message"), [
    (["--latency-raw-retention", "forever"], "bad duration 'forever'"),
    (["--latency-rollup-step", "0s"], "more than zero"),
    (["--latency-raw-retention", "1m", "--latency-rollup-step", "5m"], "must not be longer than the raw retention"),
    (["--latency-rollup-retention", "1h"], "must not be shorter than the raw retention"),
])
def test_bad_retention_flags_stop_the_server_before_it_starts(tmp_path: Path, args: list[str], message: str) -> None:
    result = run("server", "--data-dir", tmp_path / "nowhere", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "nowhere").exists()


# -- timespec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("15m", 900.0), ("24h", 86400.0), ("30d", 2_592_000.0), ("1w", 604_800.0), ("1.5h", 5400.0),
    ("500ms", 0.5), ("45", 45.0), (" 2 m ", 120.0), (".5s", 0.5),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-5m", "0", "0s", "1e3", "nan", "5 minutes"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UserInputError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("now", T0), ("1h", T0 - 3600), ("-15m", T0 - 900), ("now-1d", T0 - 86400), ("now - 30s", T0 - 30),
    ("1700000000", 1_700_000_000.0), ("1700000000.5", 1_700_000_000.5),
    ("2023-11-14T22:00:00Z", 1_699_999_200.0), ("2023-11-14T23:00:00+01:00", 1_699_999_200.0),
    ("2023-11-14T22:00:00", 1_699_999_200.0), ("2023-11-14", 1_699_920_000.0),
])
def test_times(text: str, expected: float) -> None:
    assert parse_time(text, T0) == expected


@pytest.mark.parametrize("text", ["yesterday", "now+1h", "-", "2023-13-40", "inf", "-1700000000x"])
def test_bad_times(text: str) -> None:
    with pytest.raises(UserInputError):
        parse_time(text, T0)


def test_auto_step_keeps_a_range_within_its_points() -> None:
    assert auto_step(0, 3600) == 30.0
    assert auto_step(0, 86400) == 900.0
    assert auto_step(0, 60) == 1.0
    for span in (1, 59, 3601, 7 * 86400, 400 * 86400):
        assert span / auto_step(0, span) <= 120
    assert [format_duration(s) for s in (90, 900, 86400, 0.5, 604800)] == ["90s", "15m", "1d", "0.5s", "1w"]
