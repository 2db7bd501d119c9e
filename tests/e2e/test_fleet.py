"""End to end: a real Mosquitto, the server and two agent *processes*.

A digits CNN trained here is rolled out through the CLI; each agent commits
its profile's variant. Then a tampered artifact is rejected, a variant below
the accuracy gate is rolled back, and malformed MQTT payloads are shrugged
off, each time leaving the previous model untouched.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from server.broker import Mosquitto, free_port
from tests.e2e.fleet import Fleet, cli, expect_state

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, fleet_init_args: tuple[str, ...]) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    broker = Mosquitto(root / "broker").start()
    fleet = Fleet(root, broker, root / "server")
    try:
        cli("init", "--data-dir", str(fleet.data_dir), "--release-key", "online", *fleet_init_args)
        for name, profile in (("pi", "rpi4"), ("nano", "jetson-nano")):
            fleet.register(name, profile)
            fleet.start_agent(name)
        fleet.devices = {n: str(row["id"]) for n, row in fleet.device_list().items()}
        fleet.dashboard = f"http://127.0.0.1:{free_port()}"
        fleet.start_server()
        fleet.wait_online("pi", "nano")
        yield fleet
    finally:
        fleet.stop()
        fleet.broker.stop()  # the broker-restart test replaces the first one


@pytest.fixture(scope="module")
def first_rollout(fleet: Fleet, digits_inputs: tuple[Path, Path]) -> dict[str, object]:
    model, evalset = digits_inputs
    out = cli("model", "add", "digits", "--file", str(model), "--eval", str(evalset), "--data-dir", str(fleet.data_dir))
    assert out.startswith("digits:1")
    rollout_id = cli(
        "rollout", "start", "digits", "--profile", "rpi4", "--profile", "jetson-nano", "--data-dir", str(fleet.data_dir)
    ).strip()
    return fleet.wait_settled(rollout_id)


def test_each_agent_commits_the_variant_auto_chose_for_its_profile(
    fleet: Fleet, first_rollout: dict[str, object]
) -> None:
    expect_state(first_rollout, "succeeded")
    devices = {d["device"]: d for d in first_rollout["devices"]}  # type: ignore[attr-defined]
    report = json.loads(cli("model", "report", "digits:1", "--data-dir", str(fleet.data_dir), "--json"))
    chosen = {r["profile"]: [v for v in r["variants"] if v["chosen"]] for r in report}
    for device, profile in (("pi", "rpi4"), ("nano", "jetson-nano")):
        (variant,) = chosen[profile]
        assert variant["recipe"] == devices[device]["quantization"]  # the report's pick is what shipped
        assert variant["size_bytes"] == devices[device]["size_bytes"]
        assert variant["accuracy"] >= next(r for r in report if r["profile"] == profile)["reference_accuracy"] - 0.01
    # preferred quantizations win the ties inside the latency noise band on this host
    assert devices["pi"]["quantization"] == "int8"
    assert devices["nano"]["quantization"] == "float16"
    for row in devices.values():
        assert row["state"] == "committed"
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["accuracy"] >= 0.9
        assert row["size_bytes"] > 0
    assert devices["pi"]["size_bytes"] < devices["nano"]["size_bytes"]
    listed = fleet.device_list()
    assert listed["pi"]["active_model"] == "digits" and listed["pi"]["active_quantization"] == "int8"
    assert listed["nano"]["active_version"] == 1 and listed["nano"]["online"] is True


def test_dashboard_shows_on_device_latency(fleet: Fleet, first_rollout: dict[str, object]) -> None:
    for name in ("pi", "nano"):
        with urllib.request.urlopen(f"{fleet.dashboard}/api/v1/devices/{name}", timeout=10) as response:
            detail = json.load(response)
        latest = detail["deployments"][0]
        assert latest["rollout"] == first_rollout["rollout"] and latest["state"] == "committed"
        assert 0 < latest["p50_ms"] <= latest["p95_ms"]
        assert detail["device"]["runtime"].startswith("ai-edge-litert")
    with urllib.request.urlopen(f"{fleet.dashboard}/api/v1/rollouts", timeout=10) as response:
        assert json.load(response)[0]["rollout"] == first_rollout["rollout"]
    with urllib.request.urlopen(f"{fleet.dashboard}/", timeout=10) as response:
        page = response.read().decode()
    assert "/static/dashboard.js" in page
    try:
        urllib.request.urlopen(f"{fleet.dashboard}/api/v1/rollouts/r-nope", timeout=10)
        raise AssertionError("an unknown rollout must be a 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        assert exc.headers["Content-Type"] == "application/problem+json"


def _add_version(fleet: Fleet, model_path: Path, eval_path: Path) -> str:
    return cli("model", "add", "digits", "--file", str(model_path), "--eval", str(eval_path),
               "--data-dir", str(fleet.data_dir)).split()[0]


def test_tampered_artifact_is_rejected_and_previous_model_kept(
    fleet: Fleet, first_rollout: dict[str, object], tmp_path: Path
) -> None:
    from server.compress.digits import write_demo_inputs

    ref = _add_version(fleet, *write_demo_inputs(tmp_path, seed=1))
    # The release is signed over good bytes; then the store is altered before the server ships them.
    fleet.stop_process("server")
    rollout_id = cli("rollout", "start", ref, "--device", "pi", "--data-dir", str(fleet.data_dir)).strip()
    (variant,) = [v for v in json.loads(cli("model", "report", ref, "--profile", "rpi4", "--data-dir",
                                            str(fleet.data_dir), "--json"))[0]["variants"] if v["chosen"]]
    blob = fleet.data_dir / "artifacts" / variant["sha256"][:2] / variant["sha256"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = fleet.active_digest("pi")
    fleet.start_server()

    status = fleet.wait_settled(rollout_id)

    (row,) = status["devices"]  # type: ignore[misc]
    assert status["state"] == "rolled_back"  # the gate failed; the default policy rolls back (nothing changed)
    assert row["state"] == "failed"
    assert "came only in copies that do not match its signed sha256" in row["reason"]
    assert fleet.active_digest("pi") == before
    assert fleet.device_list()["pi"]["active_version"] == 1
    # and the server itself refuses to sign anything new from the corrupted blob
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet", "rollout", "start", ref, "--device", "pi", "--data-dir",
         str(fleet.data_dir)], capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1 and "corrupted" in proc.stderr and "Traceback" not in proc.stderr


def test_variant_below_accuracy_gate_is_rolled_back(fleet: Fleet, first_rollout: dict[str, object], tmp_path: Path) -> None:
    from server.compress.digits import train_weak_digits_model
    from server.compress.evalset import write_eval_file

    model, test_set = train_weak_digits_model()
    model.save(tmp_path / "weak.keras")
    ref = _add_version(fleet, tmp_path / "weak.keras", write_eval_file(test_set, tmp_path / "weak-eval.npz"))
    before = fleet.active_digest("nano")

    rollout_id = cli(
        "rollout", "start", ref, "--device", "nano", "--min-accuracy", "0.9", "--data-dir", str(fleet.data_dir)
    ).strip()
    status = fleet.wait_settled(rollout_id)

    (row,) = status["devices"]  # type: ignore[misc]
    assert row["state"] == "rolled_back", row
    assert "accuracy" in row["reason"] and "below the gate" in row["reason"]
    assert row["accuracy"] is not None and row["accuracy"] < 0.9
    assert fleet.active_digest("nano") == before
    listed = fleet.device_list()["nano"]
    assert (listed["active_model"], listed["active_version"]) == ("digits", 1)


def test_malformed_payloads_are_logged_and_loops_go_on(fleet: Fleet, first_rollout: dict[str, object]) -> None:
    pi = fleet.devices["pi"]
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="e2e-prankster", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", fleet.broker.port)
    client.loop_start()
    try:
        garbage = [b"not json", b"[1,2]", b'{"v": 99}', b'{"v": 1, "surprise": true}', b"\xff\xfe", b"{" * 10]
        topics = [f"ef/v1/devices/{pi}/{kind}" for kind in ("desired", "cmd", "events", "telemetry", "state")]
        topics += [f"ef/v1/devices/{pi}/want/{'0' * 64}", "ef/v1/devices/NOT_AN_ID/events"]
        for topic in topics:
            for payload in garbage:
                client.publish(topic, payload, qos=1).wait_for_publish(5)
        # then a valid ping: the agent answers with its state, so its loop is still turning
        client.publish(f"ef/v1/devices/{pi}/cmd", b'{"v":1,"name":"ping","args":{}}', qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    deadline = time.monotonic() + 30
    while "dropped a malformed message" not in fleet.log("server") or fleet.log("pi").count("dropped a malformed") < 2:
        assert time.monotonic() < deadline, "malformed messages were not logged"
        time.sleep(0.3)
    time.sleep(1)
    fleet.assert_alive()
    assert "Traceback" not in fleet.log("server") + fleet.log("pi")
    assert fleet.device_list()["pi"]["online"] is True


def test_broker_restart_is_survived_and_rollouts_still_land(fleet: Fleet, first_rollout: dict[str, object]) -> None:
    port = fleet.broker.port
    fleet.broker.stop()
    time.sleep(3)
    fleet.assert_alive()  # nobody crashes while the broker is gone
    fleet.broker = Mosquitto(fleet.root / "broker-2", port=port).start()
    deadline = time.monotonic() + 60
    # The MQTT link's own line, once per connection ("connected to mqtt://HOST:PORT" and nothing after).
    connects = re.compile(rf"connected to mqtt://127\.0\.0\.1:{port}$", re.MULTILINE)
    while any(len(connects.findall(fleet.log(name))) < 2 for name in ("server", "pi", "nano")):
        fleet.assert_alive()
        assert time.monotonic() < deadline, "not everyone reconnected to the restarted broker"
        time.sleep(0.5)

    # The same model again: its trial times it against itself, and a 20 µs model's p95 on a busy 2-core machine
    # measures the scheduler (2.47x itself, seen in CI). This test is about the broker, not the latency gate.
    rollout_id = cli("rollout", "start", "digits:1", "--device", "pi", "--max-latency-ratio", "1000", "--data-dir",
                     str(fleet.data_dir)).strip()
    expect_state(fleet.wait_settled(rollout_id), "succeeded")
