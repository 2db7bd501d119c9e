"""``edgefleet device register-fleet``: many devices in one go, each with the config ``device register`` writes."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from server.broker_setup import BrokerLayout, password_hash, setup_broker
from tests.server.test_cli_errors import assert_ok, assert_user_error, run
from tests.server.test_device_cli import audit_log, names


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An initialised data directory with its own (TLS) broker, so every device gets a broker identity."""
    from server.setup import init_data_dir

    root = tmp_path / "data"
    init_data_dir(root).db.close()
    setup_broker(BrokerLayout(root / "broker"), listen="127.0.0.1:18883")
    return root


def register_fleet(data_dir: Path, out: Path, *extra: str, prefix: str = "sim", count: str = "3") -> str:
    return assert_ok(run("device", "register-fleet", "--prefix", prefix, "--count", count, "--profile", "rpi4",
                         "--out-dir", out, "--data-dir", data_dir, *extra))


def _without_identity(text: str, name: str, device_id: str, password: str) -> str:
    return text.replace(name, "NAME").replace(device_id, "ID").replace(password, "PASSWORD")


def test_registers_every_device_with_the_config_device_register_writes(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    listing = json.loads(register_fleet(data_dir, out, "--json"))
    assert [d["name"] for d in listing["devices"]] == ["sim-00001", "sim-00002", "sim-00003"]
    assert names(data_dir) == ["sim-00001", "sim-00002", "sim-00003"]
    assert listing["broker"] == "mqtts://127.0.0.1:18883"

    single = out / "one.toml"  # beside them: the same directory, so the same data dir and shared files
    assert_ok(run("device", "register", "one", "--profile", "rpi4", "--data-dir", data_dir, "--out", single))
    one = load_config(single)
    expected = _without_identity(single.read_text(), "one", one.device.id, one.broker.password)
    passwords = BrokerLayout(data_dir / "broker").passwords.read_text()
    for device in listing["devices"]:
        path = Path(device["config"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        config = load_config(path)  # a valid agent.toml: root of trust and CA beside it
        assert config.device.id == device["id"] and config.broker.username == device["id"]
        assert config.broker.ca_file == str(out / "ca.pem")
        assert _without_identity(path.read_text(), device["name"], device["id"], config.broker.password) == expected
        assert re.search(rf"^{device['id']}:\$7\$", passwords, re.MULTILINE)  # the broker knows it already
    assert len({load_config(Path(d["config"])).broker.password for d in listing["devices"]}) == 3
    assert [e.kind for e in audit_log(data_dir)].count("device.registered") == 4


def test_agent_data_dirs_go_under_the_given_root(data_dir: Path, tmp_path: Path) -> None:
    register_fleet(data_dir, tmp_path / "fleet", "--agent-data-dir", str(tmp_path / "agents"), "--start", "7",
                   count="2")
    config = load_config(tmp_path / "fleet" / "sim-00008.toml")
    assert config.data_dir == tmp_path / "agents" / "sim-00008"


def test_names_already_taken_register_nothing_and_leave_no_config(data_dir: Path, tmp_path: Path) -> None:
    register_fleet(data_dir, tmp_path / "first", count="2")
    result = run("device", "register-fleet", "--prefix", "sim", "--count", "4", "--profile", "rpi4", "--out-dir",
                 tmp_path / "second", "--data-dir", data_dir)
    assert_user_error(result, "2 of these names are already registered", "sim-00001, sim-00002",
                      "nothing was registered")
    assert names(data_dir) == ["sim-00001", "sim-00002"]
    assert not list((tmp_path / "second").glob("*.toml"))


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--prefix", "sim", "--count", "0", "--profile", "rpi4"), ("--count must be between 1 and",)),
        (("--prefix", "b@d", "--count", "2", "--profile", "rpi4"), ("invalid device name 'b@d-00001'",)),
        (("--prefix", "sim", "--count", "2", "--profile", "toaster"), ("unknown profile 'toaster'",)),
        (("--prefix", "sim", "--count", "2", "--profile", "rpi4", "--broker", "http://x"),
         ("broker must look like mqtt://",)),
    ],
)
def test_bad_arguments_are_clear_errors(data_dir: Path, tmp_path: Path, args: tuple[str, ...],
                                        fragments: tuple[str, ...]) -> None:
    result = run("device", "register-fleet", *args, "--out-dir", tmp_path / "fleet", "--data-dir", data_dir)
    assert_user_error(result, *fragments)
    assert names(data_dir) == []
    assert not list((tmp_path / "fleet").glob("*.toml"))


def test_an_existing_config_is_never_overwritten(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    out.mkdir()
    (out / "sim-00002.toml").write_text("mine")
    result = run("device", "register-fleet", "--prefix", "sim", "--count", "3", "--profile", "rpi4", "--out-dir",
                 out, "--data-dir", data_dir)
    assert_user_error(result, "sim-00002.toml already exists")
    assert (out / "sim-00002.toml").read_text() == "mine"
    assert sorted(p.name for p in out.glob("*.toml")) == ["sim-00002.toml"]
    assert names(data_dir) == []


@pytest.mark.parametrize(("failpoint", "registered"), [("server.fleet.claimed", False),
                                                       ("server.fleet.registered", True)])
def test_a_run_killed_midway_carries_on_when_run_again(data_dir: Path, tmp_path: Path, failpoint: str,
                                                       registered: bool) -> None:
    """SIGKILL after the configs are claimed, or after the devices are committed (their passwords only in
    the dead process's memory): a new run for more devices takes the empty configs over, gives the devices
    already registered new passwords, and registers the rest; nobody twice, every config usable."""
    out = tmp_path / "fleet"
    killed = subprocess.run(
        [sys.executable, "-m", "edgefleet", "device", "register-fleet", "--prefix", "sim", "--count", "3",
         "--profile", "rpi4", "--out-dir", str(out), "--data-dir", str(data_dir)],
        env={**os.environ, "EDGEFLEET_FAILPOINTS": f"{failpoint}=kill"}, capture_output=True, text=True,
        timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr
    assert names(data_dir) == (["sim-00001", "sim-00002", "sim-00003"] if registered else [])
    assert sorted((p.name, p.stat().st_size) for p in out.glob("sim-*.toml")) == [
        (f"sim-0000{i}.toml", 0) for i in (1, 2, 3)]

    listing = json.loads(register_fleet(data_dir, out, "--json", count="5"))

    assert names(data_dir) == [f"sim-0000{i}" for i in range(1, 6)]
    passwords = BrokerLayout(data_dir / "broker").passwords.read_text()
    for device in listing["devices"]:
        config = load_config(Path(device["config"]))
        assert config.device.id == device["id"]
        entry = re.search(rf"^{device['id']}:(\S+)$", passwords, re.MULTILINE).group(1)  # type: ignore[union-attr]
        salt = base64.b64decode(entry.split("$")[3])
        assert password_hash(config.broker.password, salt=salt) == entry  # what the broker checks
    kinds = [e.kind for e in audit_log(data_dir)]
    assert (kinds.count("device.registered"), kinds.count("device.resumed")) == (5, 3 if registered else 0)
    assert not list(out.glob(".*.tmp"))

