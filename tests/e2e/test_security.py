"""End to end, locked down: the fleet broker as ``edgefleet init`` and ``edgefleet broker`` set it up (TLS with the
fleet CA, per-device identities, topic ACLs, anonymous access off), the server over HTTPS, and two devices that
enrol themselves with one-time tokens (``edgefleet agent enrol``) and then each commit a rollout.

Then, from a paho client holding device A's credentials: A cannot publish on B's topics (a forged retained
"offline" for B never reaches the server) nor read B's desired state, while its own arrives; an anonymous client
is refused; B's used token gets nothing; and a removed device is cut off at once and cannot connect again.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from server.broker import free_port
from shared.codec import encode
from shared.messages import Availability
from tests.attacks.test_broker_attacks import SETTLE_S, Client
from tests.e2e.fleet import Fleet, cli, expect_state, wait_for
from tests.fleet_broker import FleetBroker

pytestmark = pytest.mark.e2e

DEVICES = (("cam-a", "x86-64"), ("cam-b", "rpi4"))
TOKENS: dict[str, str] = {}  # the enrolment token each device used


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, digits_inputs: tuple[Path, Path]) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("security")
    data_dir = root / "server"
    broker = FleetBroker(data_dir)
    cli("init", "--data-dir", str(data_dir), "--release-key", "online", "--broker-host", "127.0.0.1", "--broker-listen", broker.listen)
    fleet = Fleet(root, broker.start(), data_dir)
    try:
        tls = data_dir / "broker" / "tls"
        fleet.dashboard = f"https://127.0.0.1:{free_port()}"
        fleet.start("server", "server", "--data-dir", str(data_dir), "--http", fleet.dashboard.removeprefix("https://"),
                    "--http-cert", str(tls / "server.pem"), "--http-key", str(tls / "server-key.pem"))
        context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        wait_for(lambda: _answers(fleet.dashboard + "/healthz", context), 60, "the server's HTTPS")
        for name, profile in DEVICES:
            token = _token(cli("device", "register", name, "--profile", profile, "--data-dir", str(data_dir),
                               "--token", "--token-ttl", "10m"))
            TOKENS[name] = token
            fleet.start(name, "agent", "enrol", "--server", fleet.dashboard, "--token", token, "--data-dir",
                        str(root / name), "--serve-listen", "127.0.0.1:0")
            fleet.configs[name], fleet.agent_dirs[name] = root / name / "agent.toml", root / name / "data"
        fleet.wait_online(*(name for name, _ in DEVICES))
        fleet.devices = {n: str(row["id"]) for n, row in fleet.device_list().items()}
        model, evalset = digits_inputs
        cli("model", "add", "digits", "--file", str(model), "--eval", str(evalset), "--data-dir", str(data_dir))
        yield fleet
    finally:
        fleet.stop()
        broker.stop()


def _answers(url: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _token(output: str) -> str:
    match = re.search(r"^(efe1\.\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def credentials(fleet: Fleet, name: str) -> Client:
    """A paho client holding ``name``'s own credentials, over TLS pinned to the fleet CA."""
    return Client(load_config(fleet.configs[name]).broker_address(), f"probe-{name}").connect()


def assert_cut_off(fleet: Fleet, name: str) -> None:
    """The broker dropped ``name``'s agent (its log says it was refused since) and refuses its credentials."""
    wait_for(lambda: "refused the connection" in fleet.log(name), 30, f"{name} to be cut off and refused")
    probe = credentials(fleet, name)
    try:
        assert probe.connack == ["Not authorized"]
    finally:
        probe.close()


def test_enrolled_devices_connect_with_their_own_identity_over_tls(fleet: Fleet) -> None:
    for name, _ in DEVICES:
        config = load_config(fleet.configs[name])
        assert config.broker.url.startswith("mqtts://") and config.broker.username == fleet.devices[name]
        assert fleet.configs[name].stat().st_mode & 0o777 == 0o600
        assert f"connected to mqtts://127.0.0.1:{fleet.broker.port}" in fleet.log(name)
    audit = cli("events", "--data-dir", str(fleet.data_dir))
    assert "enrolled from 127.0.0.1" in audit


def test_each_enrolled_device_commits_a_rollout(fleet: Fleet) -> None:
    rollout = cli("rollout", "start", "digits", "--profile", "x86-64", "--profile", "rpi4", "--data-dir",
                  str(fleet.data_dir)).strip()
    status = expect_state(fleet.wait_settled(rollout), "succeeded")
    assert sorted((row["device"], row["state"]) for row in status["devices"]) == [
        ("cam-a", "committed"), ("cam-b", "committed")]
    # the server's acknowledgements reach each device through its ACL: its outbox empties
    for name, _ in DEVICES:
        wait_for(lambda n=name: outbox_waiting(fleet, n) == 0, 60, f"{name}'s outbox to empty")


def outbox_waiting(fleet: Fleet, name: str) -> int:
    status = json.loads(cli("agent", "status", "--config", str(fleet.configs[name]), "--json"))
    return int(status["outbox"]["waiting"])


def test_device_a_cannot_publish_on_b_or_read_bs_desired_state(fleet: Fleet) -> None:
    a, b = fleet.devices["cam-a"], fleet.devices["cam-b"]
    fleet.stop_process("cam-a")  # its credentials are the attacker's now: one session per identity
    attacker = credentials(fleet, "cam-a")
    try:
        assert attacker.connack == ["Success"]
        attacker.subscribe(f"ef/v1/devices/{b}/desired", f"ef/v1/devices/{a}/desired")
        forged = json.dumps(encode(Availability(v=1, online=False))).encode()
        attacker.publish(f"ef/v1/devices/{b}/availability", forged, retain=True)
        time.sleep(SETTLE_S)
        # its own retained desired state arrives; B's does not
        assert attacker.topics() == {f"ef/v1/devices/{a}/desired"}
        time.sleep(2)  # the server would have marked B offline by now had the forged message got through
        assert fleet.device_list()["cam-b"]["online"] is True
    finally:
        attacker.close()
        fleet.start_agent("cam-a")
    fleet.wait_online("cam-a")


def test_an_anonymous_client_is_refused(fleet: Fleet) -> None:
    from dataclasses import replace

    address = load_config(fleet.configs["cam-b"]).broker_address()
    anonymous = Client(replace(address, username=None, password=None), "anonymous").connect()
    try:
        assert anonymous.connack == ["Not authorized"]
    finally:
        anonymous.close()


def test_a_used_token_gets_nothing(fleet: Fleet, tmp_path: Path) -> None:
    from agent.enrol import enrol
    from shared.errors import TransportError

    with pytest.raises(TransportError, match="already used"):
        enrol(fleet.dashboard, TOKENS["cam-b"], tmp_path / "thief")


def test_a_removal_killed_before_it_told_the_broker_still_cuts_the_device_off(fleet: Fleet) -> None:
    """``device remove`` SIGKILLed after its commit, before it rewrote the broker's identities: the running
    server notices the difference within seconds and the broker drops the device."""
    env = {**os.environ, "EDGEFLEET_FAILPOINTS": "server.device.removed=kill"}
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "device", "remove", "cam-a", "--data-dir",
                           str(fleet.data_dir)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr
    assert "cam-a" not in fleet.device_list()  # the removal itself was committed
    assert_cut_off(fleet, "cam-a")


def test_a_removed_device_is_cut_off_and_cannot_connect_again(fleet: Fleet) -> None:
    cli("device", "remove", "cam-b", "--data-dir", str(fleet.data_dir))
    assert_cut_off(fleet, "cam-b")
    fleet.assert_alive()  # the agent keeps running (and retrying); nothing crashed
