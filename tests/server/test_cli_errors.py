"""The operator CLI: every user mistake is one clear line on stderr and a non-zero exit, never a traceback.

Most cases drive ``edgefleet.cli.cli`` in-process with click's ``CliRunner``
(an unexpected exception shows up there as ``result.exception`` that is not
``SystemExit``); a few run ``python -m edgefleet`` in a subprocess to prove
what reaches a real terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from agent.config import load_config
from edgefleet.cli import cli
from server.db.models import Device, ModelVersion, Rollout
from server.devices import register_device
from server.profiles import BUILTIN_PROFILES
from server.setup import Workspace, init_data_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES = [p.name for p in BUILTIN_PROFILES]


def run(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit code 1, one ``Error: ...`` line on stderr naming ``fragments``, no traceback anywhere."""
    assert result.exc_info is not None and result.exc_info[0] is SystemExit, (
        f"unexpected {result.exception!r}; output:\n{result.output}"
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""
    return lines[0]


def assert_ok(result: Result) -> str:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.stdout


@pytest.fixture
def data_dir(tmp_path: Path, db_url: str) -> Path:
    """An initialised data directory with no model (its registry on each back-end)."""
    root = tmp_path / "data"
    init_data_dir(root, db_url=db_url).db.close()
    return root


def count(workspace: Workspace, table: type) -> int:
    with workspace.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


# -- the data directory --------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["device", "list"],
        ["device", "register", "cam-1", "--profile", "rpi4", "--out", "agent.toml"],
        ["model", "add", "digits", "--file", "m.keras", "--eval", "e.npz"],
        ["rollout", "start", "digits", "--profile", "rpi4"],
        ["rollout", "status", "r-00000000"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_data_dir_that_was_never_initialised(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    result = run(*command, "--data-dir", missing)
    assert_user_error(result, "not an edgefleet data directory", "edgefleet init")
    assert not missing.exists()  # a read command does not create it


def test_init_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert_user_error(run("init", "--data-dir", tmp_path / "file" / "data"), "cannot create the data directory")


def test_init_twice_is_fine(tmp_path: Path) -> None:
    for _ in range(2):
        assert "initialised" in assert_ok(run("init", "--data-dir", tmp_path / "data", "--release-key-out",
                                              tmp_path / "release.pem"))


# -- device register ----------------------------------------------------------------------------


def register(data_dir: Path, name: str, *extra: str | Path, profile: str = "rpi4", out: Path | None = None) -> Result:
    target = out or data_dir.parent / f"{name}.toml"
    return run("device", "register", name, "--profile", profile, "--data-dir", data_dir, "--out", target, *extra)


def test_an_unknown_profile_lists_the_known_ones(data_dir: Path) -> None:
    line = assert_user_error(register(data_dir, "cam-1", profile="rpi9"), "unknown profile 'rpi9'", "known profiles")
    assert all(name in line for name in PROFILES)
    assert not (data_dir.parent / "cam-1.toml").exists()


def test_a_duplicate_device_name(data_dir: Path) -> None:
    assert_ok(register(data_dir, "cam-1"))
    result = register(data_dir, "cam-1", out=data_dir.parent / "second.toml")
    assert_user_error(result, "'cam-1'", "already registered")
    assert not (data_dir.parent / "second.toml").exists()


@pytest.mark.parametrize("name", ["bad name", "_leading-underscore", ".hidden", "x" * 65, "ünïcode", "a/b", ""])
def test_an_invalid_device_name(data_dir: Path, name: str) -> None:
    assert_user_error(register(data_dir, name, out=data_dir.parent / "agent.toml"), "invalid device name")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("http://x", "mqtt://HOST:PORT"), ("mqtt://", "mqtt://HOST:PORT"), ("broker:1883", "mqtt://HOST:PORT"),
     ("mqtt://host:99999", "bad port")],
)
def test_a_bad_broker_url(data_dir: Path, url: str, fragment: str) -> None:
    assert_user_error(register(data_dir, "cam-1", "--broker", url), fragment)
    assert json.loads(assert_ok(run("device", "list", "--data-dir", data_dir, "--json"))) == []


def test_an_out_file_that_already_exists(data_dir: Path) -> None:
    out = data_dir.parent / "agent.toml"
    out.write_text("# someone's config\n")

    assert_user_error(register(data_dir, "cam-1", out=out), str(out), "already exists")

    assert out.read_text() == "# someone's config\n"  # untouched
    assert json.loads(assert_ok(run("device", "list", "--data-dir", data_dir, "--json"))) == []  # nothing registered


def test_an_out_path_that_cannot_be_written(data_dir: Path) -> None:
    (data_dir.parent / "a-file").write_text("x")

    assert_user_error(register(data_dir, "cam-1", out=data_dir.parent / "a-file" / "agent.toml"), "agent.toml")

    assert json.loads(assert_ok(run("device", "list", "--data-dir", data_dir, "--json"))) == []


# -- model add ------------------------------------------------------------------------------------


def model_add(data_dir: Path, model: Path, evalset: Path, name: str = "digits") -> Result:
    return run("model", "add", name, "--file", model, "--eval", evalset, "--data-dir", data_dir)


def npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_model_add_with_a_missing_model_file(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    missing = data_dir.parent / "missing.keras"
    assert_user_error(model_add(data_dir, missing, digits_inputs[1]), "model file not found", "missing.keras")


def test_model_add_with_a_missing_eval_file(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    missing = data_dir.parent / "missing.npz"
    assert_user_error(model_add(data_dir, digits_inputs[0], missing), "evaluation file not found", "missing.npz")


def test_model_add_with_an_eval_file_without_x_and_y(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    bad = npz(data_dir.parent / "bad.npz", images=np.zeros((3, 8, 8, 1), np.float32), labels=np.zeros(3, np.int64))
    assert_user_error(model_add(data_dir, digits_inputs[0], bad), "no array 'x' or 'y'", "'images'", "numpy.savez")


def test_model_add_with_an_eval_file_that_is_not_an_npz(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    bad = data_dir.parent / "eval.npz"
    bad.write_text("x,y\n1,2\n")
    assert_user_error(model_add(data_dir, digits_inputs[0], bad), "not an .npz archive")


def test_model_add_with_an_eval_shape_that_does_not_fit_the_model(
    data_dir: Path, digits_inputs: tuple[Path, Path]
) -> None:
    bad = npz(data_dir.parent / "bad.npz", x=np.zeros((5, 4, 4, 1), np.float32), y=np.zeros(5, np.int64))
    assert_user_error(model_add(data_dir, digits_inputs[0], bad), "(4, 4, 1)", "(8, 8, 1)")


def test_model_add_with_labels_out_of_range(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    bad = npz(data_dir.parent / "bad.npz", x=np.zeros((5, 8, 8, 1), np.float32), y=np.array([0, 1, 2, 3, 12]))
    assert_user_error(model_add(data_dir, digits_inputs[0], bad), "labels go up to 12", "10 classes")


@pytest.mark.parametrize("content", [b"definitely not a model", b"PK\x03\x04 broken zip", b""])
def test_model_add_with_a_garbage_keras_file(data_dir: Path, digits_inputs: tuple[Path, Path], content: bytes) -> None:
    garbage = data_dir.parent / "garbage.keras"
    garbage.write_bytes(content)
    assert_user_error(model_add(data_dir, garbage, digits_inputs[1]), "garbage.keras")


def test_model_add_with_an_unsupported_model_format(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    other = data_dir.parent / "model.pb"
    other.write_bytes(b"\x00")
    assert_user_error(model_add(data_dir, other, digits_inputs[1]), "unsupported model format", ".keras")


def test_model_add_with_an_invalid_name(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    assert_user_error(model_add(data_dir, *digits_inputs, name="my model"), "invalid model name")


def test_failed_model_adds_leave_no_version_behind(data_dir: Path, digits_inputs: tuple[Path, Path]) -> None:
    assert_user_error(model_add(data_dir, data_dir.parent / "missing.keras", digits_inputs[1]))
    bad = npz(data_dir.parent / "bad.npz", x=np.zeros((5, 8, 8, 1), np.float32), y=np.array([0, 1, 2, 3, 12]))
    assert_user_error(model_add(data_dir, digits_inputs[0], bad))

    assert assert_ok(model_add(data_dir, *digits_inputs)).startswith("digits:1 ")


# -- rollout start / status -------------------------------------------------------------------------


@pytest.fixture
def fleet_dir(workspace: Workspace) -> Path:
    """The workspace (digits:1 added) with one x86-64 device, cam-1."""
    register_device(workspace.db, "cam-1", "x86-64")
    return workspace.data_dir.root


ROLLOUT_START_MISTAKES: list[tuple[list[str], list[str]]] = [
    (["nosuch", "--device", "cam-1"], ["unknown model 'nosuch'", "edgefleet model add"]),
    (["digits:9", "--device", "cam-1"], ["'digits'", "no version 9"]),
    (["digits:0", "--device", "cam-1"], ["positive integer"]),
    (["digits:two", "--device", "cam-1"], ["positive integer"]),
    ([":1", "--device", "cam-1"], ["NAME[:VERSION]"]),
    (["digits"], ["--profile, --tag or --device"]),
    (["digits", "--device", "ghost"], ["unknown device 'ghost'", "edgefleet device list"]),
    (["digits", "--profile", "rpi9"], ["unknown profile 'rpi9'", *PROFILES]),
    (["digits", "--profile", "rpi5"], ["no registered device matches the selection (profile rpi5)"]),
    (["digits", "--device", "cam-1", "--min-accuracy", "1.5"], ["--min-accuracy", "between 0 and 1", "1.5"]),
    (["digits", "--device", "cam-1", "--min-accuracy", "nan"], ["--min-accuracy", "between 0 and 1"]),
    (["digits", "--device", "cam-1", "--max-accuracy-drop", "-0.1"], ["--max-accuracy-drop", "between 0 and 1"]),
]


@pytest.mark.parametrize(
    ("args", "fragments"), ROLLOUT_START_MISTAKES, ids=[" ".join(args) for args, _ in ROLLOUT_START_MISTAKES]
)
def test_rollout_start_mistakes(
    workspace: Workspace, fleet_dir: Path, args: list[str], fragments: Sequence[str]
) -> None:
    assert_user_error(run("rollout", "start", *args, "--data-dir", fleet_dir), *fragments)

    assert count(workspace, Rollout) == 0  # nothing half-created
    with workspace.db.session() as session:
        device = session.scalars(select(Device)).one()
        assert device.directive_seq == 0


def test_rollout_status_of_an_unknown_id(fleet_dir: Path) -> None:
    for extra in ([], ["--json"]):
        assert_user_error(run("rollout", "status", "r-deadbeef", "--data-dir", fleet_dir, *extra),
                          "unknown rollout 'r-deadbeef'")


def test_a_click_usage_error_is_short_too(fleet_dir: Path) -> None:
    result = run("rollout", "start", "digits", "--data-dir", fleet_dir, "--min-accuracy", "high")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "'high' is not a valid float" in result.stderr


# -- the happy path ---------------------------------------------------------------------------------


def test_init_register_add_start_status(tmp_path: Path, digits_inputs: tuple[Path, Path]) -> None:
    data = tmp_path / "data"
    assert_ok(run("init", "--data-dir", data, "--release-key", "online"))

    out = tmp_path / "agents" / "cam-1.toml"
    printed = assert_ok(run("device", "register", "cam-1", "--profile", "x86-64", "--data-dir", data, "--out", out,
                            "--broker", "mqtt://broker.local:1884"))
    assert "registered cam-1" in printed and str(out) in printed
    config = tomllib.loads(out.read_text())
    assert config["device"]["name"] == "cam-1" and config["device"]["profile"] == "x86-64"
    assert config["broker"]["url"] == "mqtt://broker.local:1884"
    assert config["keys"] == {"root_file": "root.json"}
    assert load_config(out).keys.root_file == str(out.parent / "root.json")  # written beside it, and signed

    devices = json.loads(assert_ok(run("device", "list", "--data-dir", data, "--json")))
    assert [set(d) for d in devices] == [{
        "id", "name", "profile", "online", "runtime", "update_state", "active_model", "active_version",
        "active_quantization", "tags", "active_recipe",
    }]
    assert (devices[0]["id"], devices[0]["name"], devices[0]["profile"], devices[0]["online"]) == (
        config["device"]["id"], "cam-1", "x86-64", False,
    )
    assert "cam-1" in assert_ok(run("device", "list", "--data-dir", data))  # the table

    added = assert_ok(model_add(data, *digits_inputs))
    assert added.split()[0] == "digits:1"

    rollout_id = assert_ok(run("rollout", "start", "digits:1", "--device", "cam-1", "--data-dir", data)).strip()
    assert rollout_id.startswith("r-") and "\n" not in rollout_id

    status = json.loads(assert_ok(run("rollout", "status", rollout_id, "--data-dir", data, "--json")))
    assert {"rollout", "state", "devices"} <= set(status)
    assert (status["rollout"], status["state"]) == (rollout_id, "running")
    [device] = status["devices"]
    assert {  # the keys scripts relied on before waves, still there
        "device", "profile", "state", "quantization", "size_bytes", "p50_ms", "p95_ms", "accuracy", "reason",
    } <= set(device)
    # no server is running: the device waits for the engine to start its wave
    assert (device["device"], device["profile"], device["state"]) == ("cam-1", "x86-64", "waiting")
    assert device["quantization"] == "dynamic_range" and device["size_bytes"] > 0
    assert (device["p50_ms"], device["p95_ms"], device["accuracy"], device["reason"]) == (None, None, None, "")

    table = assert_ok(run("rollout", "status", rollout_id, "--data-dir", data))
    assert rollout_id in table and "waiting" in table


def test_model_versions_count_up(workspace: Workspace, digits_inputs: tuple[Path, Path]) -> None:
    data = workspace.data_dir.root  # digits:1 is already there
    assert assert_ok(model_add(data, *digits_inputs)).startswith("digits:2 ")
    assert count(workspace, ModelVersion) == 2


# -- what a real terminal sees -----------------------------------------------------------------------


def edgefleet(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *map(str, args)], capture_output=True, text=True, env=env, timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["device", "list", "--data-dir", "{tmp}/never-initialised"], "not an edgefleet data directory"),
        (["device", "register", "cam-1", "--profile", "rpi9", "--data-dir", "{data}", "--out", "{tmp}/a.toml"],
         "known profiles: arm64, jetson-nano, jetson-orin, rpi-zero2, rpi4, rpi5, x86-64"),
        (["device", "register", "cam-1", "--profile", "rpi4", "--broker", "http://x", "--data-dir", "{data}",
          "--out", "{tmp}/a.toml"], "mqtt://HOST:PORT"),
    ],
    ids=["uninitialised", "unknown profile", "bad broker"],
)
def test_no_traceback_reaches_the_terminal(data_dir: Path, args: list[str], fragment: str) -> None:
    tmp = data_dir.parent
    proc = edgefleet(*(a.format(tmp=tmp, data=data_dir) for a in args))

    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], proc.stderr
