"""What an operator sees in the terminal: ``edgefleet top``, build progress, and no TensorFlow start-up noise."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from edgefleet.cli import cli
from server.build_progress import build_progress
from server.compress.progress import BuildEvent, Step
from server.devices import register_device
from server.ingest import apply_availability, apply_telemetry
from server.setup import Workspace, init_data_dir, open_workspace
from server.top import TopRow, age, top_table
from shared import PROTOCOL_VERSION
from shared.histogram import LatencyHistogram, bucket_of, lower_edge_ms, upper_edge_ms
from shared.messages import Availability, ServingReport, Telemetry
from shared.startup_noise import NOISE_MARKERS

# -- edgefleet top -------------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Workspace]:
    """Three devices: cam-b (rpi4, online, serving digits:3), cam-a (rpi4, online, no reports), gw-1 (x86-64, offline)."""
    init_data_dir(tmp_path / "data").db.close()
    workspace = open_workspace(tmp_path / "data")
    ids = {name: register_device(workspace.db, name, profile).id
           for name, profile in (("cam-b", "rpi4"), ("cam-a", "rpi4"), ("gw-1", "x86-64"))}
    with workspace.db.session() as session:
        for name in ("cam-a", "cam-b"):
            apply_availability(session, ids[name], Availability(v=PROTOCOL_VERSION, online=True))
        assert apply_telemetry(session, serving(ids["cam-b"], [1.0] * 90 + [8.0] * 10, errors=2, end=time.time() - 5))
    yield workspace
    workspace.db.close()


def serving(device_id: str, times_ms: list[float], *, errors: int, end: float) -> Telemetry:
    invoke, e2e = LatencyHistogram(), LatencyHistogram()
    for ms in times_ms:
        invoke.record(ms)
        e2e.record(ms + 0.1)
    report = ServingReport(
        model="digits", version=3, sha256="ab" * 32, quantization="int8", runtime="ai-edge-litert", threads=4,
        source="traffic", start=end - 10, end=end, calls=len(times_ms) + errors, errors=errors,
        samples=len(times_ms) + errors, invoke=invoke.to_wire(), e2e=e2e.to_wire(), p50_ms=invoke.percentile(0.5),
        p90_ms=invoke.percentile(0.9), p99_ms=invoke.percentile(0.99),
    )
    return Telemetry(v=PROTOCOL_VERSION, device_id=device_id, boot_id="boot-1", seq=1, deployment_id=None,
                     kind="serving", ts=end, serving=report)


def within_bucket(shown: float, ms: float) -> bool:
    """``shown`` (rounded for display) lies in the histogram bucket of ``ms``."""
    index = bucket_of(ms)
    return lower_edge_ms(index) - 0.001 <= shown <= upper_edge_ms(index) + 0.001


def top(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["top", *args], catch_exceptions=False)
    return result.exit_code, result.output


def rows_of(output: str) -> dict[str, list[str]]:
    """Device name -> its cells, from the rendered table's body lines."""
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in output.splitlines() if line.startswith("│")]
    return {row[0]: row[1:] for row in cells}


def test_top_once_shows_each_device_with_and_without_latency(fleet: Workspace) -> None:
    code, output = top("--once", "--data-dir", str(fleet.data_dir.root), "--window", "5m")
    assert code == 0, output
    rows = rows_of(output)
    assert list(rows) == ["cam-a", "cam-b", "gw-1"]  # by profile, then name
    assert rows["cam-a"] == ["rpi4", "yes", "-", "-", "-", "0", "0", "-"]
    profile, online, model, p50, p95, calls, errors, last = rows["cam-b"]
    assert (profile, online, model, errors) == ("rpi4", "yes", "digits:3", "2")
    assert within_bucket(float(p50), 1.0) and within_bucket(float(p95), 8.0)  # 90 calls took 1 ms, 10 took 8
    assert float(calls) == pytest.approx(102 / 300, abs=0.01)
    assert last.endswith("s")
    assert rows["gw-1"][:2] == ["x86-64", "no"]
    assert "3 devices, 2 online" in output


def test_top_filters_by_profile_and_a_short_window_drops_old_reports(fleet: Workspace) -> None:
    code, output = top("--once", "--data-dir", str(fleet.data_dir.root), "--profile", "rpi4", "--window", "1s")
    assert code == 0, output
    rows = rows_of(output)
    assert list(rows) == ["cam-a", "cam-b"]
    # the report ended 5 s ago: outside the window, so no model (it has no active one) and no latency,
    assert rows["cam-b"][2:6] == ["-", "-", "-", "0"]
    assert rows["cam-b"][-1].endswith("s")  # but its last report is still there


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--interval", "0"], 2, "Invalid value for '--interval'"),
        (["--window", "soon"], 2, "Invalid value for '--window'"),
        (["--profile", "rpi9"], 1, "unknown profile 'rpi9'"),
    ],
)
def test_top_rejects_bad_arguments_with_one_clear_line(
    fleet: Workspace, args: list[str], code: int, fragment: str
) -> None:
    result = CliRunner().invoke(cli, ["top", "--once", "--data-dir", str(fleet.data_dir.root), *args])
    assert result.exit_code == code
    assert fragment in result.output and "Traceback" not in result.output


def test_top_table_renders_rows_without_reading_anything() -> None:
    rows = [TopRow("cam-1", "rpi4", True, "digits", 2, 0.0412, 0.09, 12.5, 0, 995.0),
            TopRow("cam-2", "rpi4", False, None, None, None, None, 0.0, 0, None)]
    console = Console(record=True, width=200)
    console.print(top_table(rows, window_s=60, now=1000.0))
    text = console.export_text()
    assert rows_of(text) == {
        "cam-1": ["rpi4", "yes", "digits:2", "0.041", "0.090", "12.50", "0", "5s"],
        "cam-2": ["rpi4", "no", "-", "-", "-", "0", "0", "-"],
    }
    assert [age(s) for s in (None, 0.4, 59, 61, 7200, 90000)] == ["-", "0s", "59s", "1m", "2h", "1d"]


# -- build progress ------------------------------------------------------------------------------

EVENTS = [
    BuildEvent(Step.PROFILE, "rpi4", index=1, total=2),
    BuildEvent(Step.VARIANT, "rpi4", "prune:0.5+int8", 1, 2),
    BuildEvent(Step.TRANSFORM, "rpi4", "prune:0.5+int8", 1, 2, "prune:0.5"),
    BuildEvent(Step.CONVERT, "rpi4", "prune:0.5+int8", 1, 2),
    BuildEvent(Step.MEASURE, "rpi4", "prune:0.5+int8", 1, 2, "52744 bytes"),
    BuildEvent(Step.DONE, "rpi4", "prune:0.5+int8", 1, 2, "52744 bytes, accuracy 0.9511"),
    BuildEvent(Step.VARIANT, "rpi4", "float32", 2, 2),
    BuildEvent(Step.DONE, "rpi4", "float32", 2, 2, "conversion failed", failed=True),
]


def test_build_progress_off_a_terminal_is_one_plain_line_per_event() -> None:
    out = io.StringIO()
    with build_progress(out) as progress:
        for event in EVENTS:
            progress(event)
    assert out.getvalue().splitlines() == [
        "rpi4: 2 candidates to build and measure",
        "rpi4: prune:0.5+int8 (1/2)",
        "rpi4: prune:0.5+int8: transform prune:0.5",
        "rpi4: prune:0.5+int8: convert",
        "rpi4: prune:0.5+int8: measure 52744 bytes",
        "rpi4: prune:0.5+int8: done: 52744 bytes, accuracy 0.9511",
        "rpi4: float32 (2/2)",
        "rpi4: float32: failed: conversion failed",
    ]


def test_build_progress_under_click_runner_writes_lines_to_its_stderr() -> None:
    import click

    @click.command()
    def command() -> None:
        with build_progress() as progress:
            progress(EVENTS[1])

    result = CliRunner().invoke(command)
    assert result.exit_code == 0 and result.output == "rpi4: prune:0.5+int8 (1/2)\n"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_build_progress_on_a_terminal_draws_bars_and_keeps_a_line_per_candidate() -> None:
    out = _Tty()
    with build_progress(out) as progress:
        for event in EVENTS:
            progress(event)
    text = out.getvalue()
    assert "\x1b[" in text  # drawn, not plain lines
    assert "rpi4: prune:0.5+int8  52744 bytes, accuracy 0.9511" in text
    assert "rpi4: float32  conversion failed" in text
    assert "2/2" in text  # the profile's bar ends full


# -- TensorFlow start-up noise ---------------------------------------------------------------------


def test_tensorflow_start_up_noise_stays_off_the_terminal_unless_verbose(tmp_path: Path) -> None:
    """A real ``model add`` that imports TensorFlow (and then fails on a broken model): quiet, one error line;
    with --verbose what TensorFlow prints comes through (so the check above can fail)."""
    init_data_dir(tmp_path / "data").db.close()
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Nothing", "config": {}}))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.random((20, 8, 8, 1), dtype=np.float32), y=np.arange(20) % 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "EDGEFLEET_"))}
    args = ["model", "add", "m", "--file", str(broken), "--eval", str(tmp_path / "eval.npz"),
            "--data-dir", str(tmp_path / "data")]
    runs = {
        verbose: subprocess.Popen([sys.executable, "-m", "edgefleet", *(["--verbose"] if verbose else []), *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for verbose in (False, True)
    }
    (quiet_out, quiet_err), (_, verbose_err) = (runs[v].communicate(timeout=120) for v in (False, True))

    assert runs[False].returncode == 1 and quiet_out == ""
    assert [m for m in NOISE_MARKERS if m in quiet_err] == [], quiet_err
    lines = quiet_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot load the Keras model in broken.keras"), quiet_err
    assert runs[True].returncode == 1
    assert any(m in verbose_err for m in NOISE_MARKERS), verbose_err
