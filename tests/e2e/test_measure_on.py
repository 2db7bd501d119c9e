"""End to end: ``model build --measure-on`` times the candidates on a real device and chooses by its numbers.

The device is an agent process whose runtime is tflite-runtime 2.14 (its own venv), set to 4 interpreter
threads, where the ranking differs from the host's LiteRT: with 4 threads (on this 2-core machine) its
int8 kernels run two orders of magnitude slower than float32, and it cannot load dynamic range at all. The host's build picks int8; the
same build measured on the device picks a float variant, and its report carries the device's numbers.
The device keeps serving its committed model throughout: a measurement is never staged or installed.
The agent is killed (SIGKILL) as its first trial starts, and the server right after it: both come back,
the server sends the order again, and the build still gets every result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.broker import Mosquitto
from tests.e2e.fleet import QUICK_AGENT_TOML, Fleet, cli, expect_state
from tests.tflite_runtime_env import tflite_runtime_python

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, digits_inputs: tuple[Path, Path]) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("measure-on")
    fleet = Fleet(root, Mosquitto(root / "broker").start(), root / "server")
    try:
        cli("init", "--data-dir", str(fleet.data_dir), "--release-key", "online")
        config = fleet.register("pi", "rpi4", extra_toml=QUICK_AGENT_TOML)
        text = config.read_text(encoding="utf-8")
        assert "threads = 0  #" in text
        config.write_text(text.replace("threads = 0  #", "threads = 4  #"), encoding="utf-8")  # the operator's
        fleet.start_agent("pi", python=tflite_runtime_python())
        fleet.start_server()
        fleet.wait_online("pi")
        model, evalset = digits_inputs
        cli("model", "add", "digits", "--file", str(model), "--eval", str(evalset), "--data-dir", str(fleet.data_dir))
        yield fleet
    finally:
        fleet.stop()
        fleet.broker.stop()


def report(fleet: Fleet) -> dict[str, Any]:
    (only,) = json.loads(cli("model", "report", "digits:1", "--profile", "rpi4", "--json",
                             "--data-dir", str(fleet.data_dir)))
    return {v["recipe"]: v for v in only["variants"]}


def test_the_device_numbers_choose_where_the_host_would_have_chosen_otherwise(fleet: Fleet) -> None:
    data = ("--data-dir", str(fleet.data_dir))
    cli("model", "build", "digits", "--profile", "rpi4", *data)
    host = report(fleet)
    assert next(r for r, v in host.items() if v["chosen"]) == "int8"  # LiteRT's XNNPACK int8 wins on the host
    assert all(v["details"].get("measured_on") is None for v in host.values())
    first = cli("rollout", "start", "digits", "--profile", "rpi4", "--max-latency-ratio", "1000", *data).strip()
    expect_state(fleet.wait_settled(first), "succeeded")
    served = fleet.active_digest("pi")
    assert served is not None

    fleet.stop_process("pi")  # back with a failpoint: it dies as its first benchmark-only trial starts
    fleet.start_agent("pi", python=tflite_runtime_python(), failpoints="agent.measure.trial.started=kill")
    fleet.wait_online("pi")
    build = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "model", "build", "digits", "--profile", "rpi4", "--measure-on", "pi",
         "--measure-timeout", "300", *data], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert fleet.wait_killed("pi", timeout=120) == -9
        fleet.kill("server")  # and the server too, with the order out and no result in
        fleet.start_server()
        fleet.start_agent("pi", python=tflite_runtime_python())  # the server sends the order again on its hello
        out, err = build.communicate(timeout=400)
    finally:
        build.kill()
    assert build.returncode == 0, f"{out}\n{err}"

    measured = report(fleet)
    chosen = next(r for r, v in measured.items() if v["chosen"])
    assert chosen in ("float32", "float16"), json.dumps(measured, indent=1)
    int8 = measured["int8"]
    assert int8["details"]["measured_on"]["devices"] == ["pi"]
    assert int8["details"]["measured_on"]["runtime"] == "tflite-runtime 2.14.0"
    assert int8["details"]["measured_on"]["threads"] == 4  # the device's own setting
    assert int8["p95_ms"] > 10 * host["int8"]["p95_ms"]  # the device's number, not the host's
    assert int8["details"]["host"]["p95_ms"] == pytest.approx(host["int8"]["p95_ms"], rel=1.0)
    assert measured["dynamic_range"]["verdict"] == "failed"
    assert measured["dynamic_range"]["reason"].startswith("on pi: load_error: tflite-runtime 2.14.0 cannot load")
    assert "on pi" in out and "MEASURED" in out

    assert fleet.active_digest("pi") == served  # measured, never installed
    assert not (fleet.agent_dirs["pi"] / "measure").exists()  # its scratch area is gone
    assert "measurement" in fleet.log("pi")
