"""End to end: an offline release key, key rotation over MQTT, and crashes around saving a new root.

Real Mosquitto, the real server and agent processes started through the CLI.
The fleet's release private key never enters the server's data directory:
releases are prepared on the server, signed by ``edgefleet release sign`` in
a bare process, imported, and rolled out. Then the release key rotates (the
agent, which knew only root v1, walks to v2 over ``ef/v1/root`` and commits a
release signed by the new key) and the old one is revoked (a release signed
by it is refused by the server and by the agent). What a compromised server
could forge with the director key alone is published straight to the agent
and refused, its trusted state and active model byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.root import TRUSTED_ROOT
from server.broker import Mosquitto
from server.keys import read_key_file
from shared.canonical import canonical_json
from shared.codec import encode
from shared.messages import DesiredState, Directive, Gates, Manifest, encode_payload
from shared.protocol import decode_versioned
from shared.release_files import read_release_file
from shared.root import root_from_json
from shared.signing import envelope_digest, key_id, sign_envelope
from shared.topics import TopicKind, device_topic
from tests.e2e.fleet import QUICK_AGENT_TOML, Fleet, cli, expect_state, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "lab"  # one fixed recipe: a fast build
REJECTED_RELEASE = "rejected desired state: no valid signature by a pinned release key"


def bare_sign(unsigned: Path, key: Path, out: Path) -> None:
    """``edgefleet release sign`` as on an offline machine: an empty environment, no data directory, and the
    server's heavy dependencies unimportable."""
    blocked = ("tensorflow", "keras", "sqlalchemy", "alembic", "server.db", "server.setup")
    program = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
               "from edgefleet.cli import main\nsys.argv = ['edgefleet', *sys.argv[1:]]\nmain()\n")
    proc = subprocess.run(
        [sys.executable, "-c", program, "release", "sign", str(unsigned), "--key", str(key), "--out", str(out)],
        cwd=key.parent, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(key.parent)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


class Keys:
    def __init__(self, fleet: Fleet, offline: Path) -> None:
        self.fleet = fleet
        self.offline = offline  # the "offline machine": the release keys live here
        self.count = 0

    @property
    def data(self) -> str:
        return str(self.fleet.data_dir)

    def release(self, key: Path) -> Path:
        """Prepare a release of digits:1 for the profile, sign it with ``key`` offline; the signed file."""
        self.count += 1
        unsigned = self.fleet.root / f"unsigned-{self.count}.json"
        cli("release", "prepare", "digits:1", "--profile", PROFILE, "--out", str(unsigned), "--data-dir", self.data)
        signed = self.offline / f"release-{self.count}.json"
        bare_sign(unsigned, key, signed)
        return signed

    def roll_out(self, signed: Path) -> dict[str, object]:
        cli("release", "import", str(signed), "--data-dir", self.data)
        rollout_id = cli("rollout", "start", "digits:1", "--profile", PROFILE, "--data-dir", self.data).strip()
        return self.fleet.wait_settled(rollout_id)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, digits_inputs: tuple[Path, Path]) -> Iterator[Keys]:
    root = tmp_path_factory.mktemp("keys")
    offline = root / "offline"
    offline.mkdir()
    fleet = Fleet(root, Mosquitto(root / "broker").start(), root / "server")
    try:
        out = cli("init", "--data-dir", str(fleet.data_dir), "--release-key-out", str(offline / "release.pem"))
        assert "release key: offline" in out
        cli("profile", "add", PROFILE, "--quantizations", "float32", "--recipe", "float32",
            "--data-dir", str(fleet.data_dir))
        fleet.register("pi", PROFILE, extra_toml=QUICK_AGENT_TOML)
        fleet.devices = {"pi": str(fleet.device_list()["pi"]["id"])}
        fleet.start_server()
        fleet.start_agent("pi")
        fleet.wait_online("pi")
        model, evalset = digits_inputs
        cli("model", "add", "digits", "--file", str(model), "--eval", str(evalset), "--data-dir", str(fleet.data_dir))
        cli("model", "build", "digits:1", "--profile", PROFILE, "--data-dir", str(fleet.data_dir))
        yield Keys(fleet, offline)
    finally:
        fleet.stop()
        fleet.broker.stop()


def agent_files(fleet: Fleet) -> dict[str, bytes]:
    """What an attack must leave byte-identical: the trusted state and root, and the active model."""
    data = fleet.agent_dirs["pi"]
    files = {name: (data / name).read_bytes() for name in ("trusted.json", TRUSTED_ROOT) if (data / name).exists()}
    files["active"] = (fleet.active_digest("pi") or "").encode()
    return files


def forge(fleet: Fleet, manifest: Manifest, *, manifest_key: Ed25519PrivateKey, director_key: Ed25519PrivateKey,
          seq: int) -> None:
    """Publish a desired state straight to the agent, as a compromised server (or anyone) could."""
    manifest_env = sign_envelope(manifest, manifest_key)
    directive = Directive(v=1, device_id=fleet.devices["pi"], deployment_id=f"dep-forged-{seq}", rollout_id="r-forged",
                          manifest_sha256=envelope_digest(manifest_env), seq=seq, gates=Gates(min_accuracy=0.0),
                          issued=int(time.time()), expires=int(time.time()) + 3600)
    payload = encode_payload(DesiredState(v=1, directive=sign_envelope(directive, director_key),
                                          manifest=manifest_env))
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="e2e-forger", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", fleet.broker.port)
    client.loop_start()
    try:
        client.publish(device_topic(TopicKind.DESIRED, fleet.devices["pi"]), payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def wait_log(fleet: Fleet, name: str, text: str, *, after: int = 0, timeout: float = 30) -> None:
    wait_for(lambda: fleet.log(name).count(text) > after, timeout, f"{name} to log {text!r}")


def newest_manifest(keys: Keys) -> Manifest:
    return decode_versioned(Manifest, read_release_file(keys.offline / f"release-{keys.count}.json").signed)


# -- the tests, in order: each builds on the fleet the previous one left ------------------------------


def test_the_server_holds_no_release_key_and_an_offline_signed_release_commits(keys: Keys) -> None:
    fleet = keys.fleet
    secret = (keys.offline / "release.pem").read_bytes()
    assert not (fleet.data_dir / "keys" / "release.pem").exists()
    assert not [p for p in fleet.data_dir.rglob("*") if p.is_file() and secret in p.read_bytes()]
    refused = subprocess.run([sys.executable, "-m", "edgefleet", "rollout", "start", "digits:1", "--profile", PROFILE,
                              "--data-dir", keys.data], capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1 and "edgefleet release prepare digits:1 --profile lab" in refused.stderr

    status = keys.roll_out(keys.release(keys.offline / "release.pem"))

    expect_state(status, "succeeded")
    assert fleet.device_list()["pi"]["active_model"] == "digits"


def test_a_release_signed_with_the_director_key_alone_is_rejected_by_the_agent(keys: Keys) -> None:
    fleet = keys.fleet
    director = read_key_file(fleet.data_dir / "keys" / "director.pem", "director key")  # all a stolen server has
    manifest = newest_manifest(keys)
    before, seen = agent_files(fleet), fleet.log("pi").count(REJECTED_RELEASE)

    forge(fleet, Manifest(**{**manifest.__dict__, "release_counter": manifest.release_counter + 100}),
          manifest_key=director, director_key=director, seq=10_000)

    wait_log(fleet, "pi", REJECTED_RELEASE, after=seen)
    assert agent_files(fleet) == before
    fleet.assert_alive()


def test_rotating_the_release_key_reaches_an_agent_that_knew_only_root_v1(keys: Keys) -> None:
    fleet = keys.fleet
    assert "trusted root" not in fleet.log("pi")  # so far it trusts the root.json it was configured with
    cli("keys", "rotate", "--role", "release", "--new-key-out", str(keys.offline / "release2.pem"),
        "--data-dir", keys.data)

    status = keys.roll_out(keys.release(keys.offline / "release2.pem"))

    assert "trusted root v1 → v2" in fleet.log("pi")
    expect_state(status, "succeeded")
    saved, _ = root_from_json((fleet.agent_dirs["pi"] / TRUSTED_ROOT).read_bytes())
    assert saved.version == 2


def test_a_release_signed_by_the_revoked_key_is_refused(keys: Keys) -> None:
    fleet = keys.fleet
    old = keys.offline / "release.pem"
    old_id = key_id(read_key_file(old, "release key").public_key())
    cli("keys", "revoke", old_id, "--data-dir", keys.data)
    wait_log(fleet, "pi", "trusted root v2 → v3")

    by_revoked = keys.release(old)
    refused = subprocess.run([sys.executable, "-m", "edgefleet", "release", "import", str(by_revoked), "--data-dir",
                              keys.data], capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1
    assert "refusing this release: no valid signature by a pinned release key (root of trust v3)" in refused.stderr

    # the agent refuses it too, even with a directive from the server's own director key
    before, seen = agent_files(fleet), fleet.log("pi").count(REJECTED_RELEASE)
    director = read_key_file(fleet.data_dir / "keys" / "director.pem", "director key")
    forge(fleet, newest_manifest(keys), manifest_key=read_key_file(old, "release key"), director_key=director,
          seq=20_000)
    wait_log(fleet, "pi", REJECTED_RELEASE, after=seen)
    assert agent_files(fleet) == before
    fleet.assert_alive()


# -- crashes around saving a new root ---------------------------------------------------------------------


@pytest.fixture
def small_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """An online data directory, one registered agent not started, the server running; no model needed."""
    fleet = Fleet(tmp_path, Mosquitto(tmp_path / "broker").start(), tmp_path / "server")
    try:
        cli("init", "--data-dir", str(fleet.data_dir), "--release-key", "online")
        fleet.register("pi", "x86-64", extra_toml=QUICK_AGENT_TOML)
        fleet.start_server()
        yield fleet
    finally:
        fleet.stop()
        fleet.broker.stop()


def root_status(fleet: Fleet) -> dict[str, object]:
    status = json.loads(cli("agent", "status", "--config", str(fleet.configs["pi"]), "--json"))
    root = status["root"]
    assert isinstance(root, dict)
    return root


def test_an_agent_killed_while_saving_a_new_root_trusts_exactly_one_of_them(small_fleet: Fleet) -> None:
    fleet = small_fleet
    saved = fleet.agent_dirs["pi"] / TRUSTED_ROOT

    # killed with the new root in the temp file, before the rename: it still trusts v1
    fleet.start_agent("pi", failpoints=f"agent.write.{TRUSTED_ROOT}=kill")
    fleet.wait_online("pi")
    cli("keys", "rotate", "--role", "director", "--data-dir", str(fleet.data_dir))
    assert fleet.wait_killed("pi") == -9
    assert not saved.exists() and list(fleet.agent_dirs["pi"].glob(f".{TRUSTED_ROOT}.*.tmp"))  # the new root, unrenamed
    assert (root_status(fleet)["version"], root_status(fleet)["source"]) == (1, "config")

    # restarted, it takes v2 from the retained chain; killed right after saving it: it trusts v2
    fleet.start_agent("pi", failpoints="agent.root.saved=kill")
    assert fleet.wait_killed("pi") == -9
    assert root_from_json(saved.read_bytes())[0].version == 2
    assert root_status(fleet)["version"] == 2 and root_status(fleet)["source"] == "data_dir"

    # and goes on from v2
    fleet.start_agent("pi")
    fleet.wait_online("pi")
    wait_log(fleet, "pi", "root of trust v2")
    cli("keys", "rotate", "--role", "director", "--data-dir", str(fleet.data_dir))
    wait_log(fleet, "pi", "trusted root v2 → v3")
    assert root_from_json(saved.read_bytes())[0].version == 3
    assert canonical_json(encode(root_from_json(saved.read_bytes())[1])) == saved.read_bytes()

