"""``edgefleet agent status`` and ``edgefleet agent check-config --connect``, through the real ``edgefleet`` command.

The data directories are prepared by real agent code (the Updater driven by the
harness, the outbox), the broker is a real Mosquitto on a free port.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agent.outbox import Outbox
from edgefleet.cli import cli
from shared.messages import UpdateState
from shared.trial import TrialResult
from tests.agent.fakes import Harness, install_first
from tests.agent.material import BENCHMARK, DEVICE, make_config, write_config_toml


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    return result.stdout


@pytest.fixture
def config_file(harness: Harness, tmp_path: Path) -> Path:
    return write_config_toml(tmp_path / "agent.toml", harness.config)


def status(config_file: Path) -> tuple[list[str], dict[str, Any]]:
    lines = ok(run("agent", "status", "--config", config_file)).splitlines()
    data = json.loads(ok(run("agent", "status", "--config", config_file, "--json")))
    return lines, data


# -- agent status --------------------------------------------------------------------------------


def test_status_before_the_agent_ever_ran(config_file: Path, harness: Harness) -> None:
    lines, data = status(config_file)
    assert lines == [
        f"device    kitchen ({DEVICE}), profile rpi5",
        f"data      {harness.data_dir} (does not exist: the agent has not run yet)",
        "slot a    empty",
        "slot b    empty",
        "committed none",
        "update    idle, no deployment yet",
        "trusted   release counter 0, directive seq 0",
        "root      none: keys pinned in the config (1 release, 1 director), no rotation",
        "outbox    0 reports waiting for the server",
        "serve     not running (configured to listen on 127.0.0.1:0)",
    ]
    assert data["serve"] == {"enabled": True, "listen": "127.0.0.1:0", "address": None}
    assert data["active_slot"] is None and data["committed"] is None
    assert data["slots"]["a"] == {"slot": "a", "active": False, "state": "empty"}
    assert data["update"] == {"state": "idle", "deployment_id": None, "outcome": None, "reason": ""}
    assert data["trusted"] == {"release_counter": 0, "directive_seq": 0, "deployment_id": None}
    assert data["outbox"] == {"waiting": 0}
    assert not harness.data_dir.exists()  # read-only: nothing was created


def test_status_after_a_commit_and_a_rollback(config_file: Path, harness: Harness) -> None:
    h = harness
    first = install_first(h)
    h.trial.result = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.5, samples=120)
    h.install(h.release(version=2))
    assert h.reporter.final()[1] is UpdateState.ROLLED_BACK
    outbox = Outbox(h.data_dir / "outbox", publish=lambda topic, payload: None)
    for seq in (1, 2, 3):
        outbox.send(f"ef/v1/devices/{DEVICE}/events", json.dumps({"boot_id": "b1", "seq": seq}).encode())
    before = h.snapshot()

    lines, data = status(config_file)

    sha = first.model_sha
    assert lines == [
        f"device    kitchen ({DEVICE}), profile rpi5",
        f"data      {h.data_dir}",
        f"slot a    kws v1 int8, model {sha[:12]}, 300 B (active)",
        "slot b    empty",
        "committed kws v1 in slot a, installed by dep-1",
        "update    idle, deployment dep-2, outcome rolled_back: accuracy 0.5000 below the gate 0.8000",
        "trusted   release counter 2, directive seq 2 (dep-2)",
        "root      none: keys pinned in the config (1 release, 1 director), no rotation",
        "outbox    3 reports waiting for the server",
        "serve     not running (configured to listen on 127.0.0.1:0)",
    ]
    assert data["slots"]["a"] == {"slot": "a", "active": True, "state": "model", "model": "kws", "version": 1,
                                  "quantization": "int8", "model_sha256": sha, "size_bytes": 300}
    assert data["committed"] == {"slot": "a", "model": "kws", "version": 1, "quantization": "int8",
                                 "model_sha256": sha, "deployment_id": "dep-1"}
    assert data["update"] == {"state": "idle", "deployment_id": "dep-2", "outcome": "rolled_back",
                              "reason": "accuracy 0.5000 below the gate 0.8000"}
    assert data["trusted"] == {"release_counter": 2, "directive_seq": 2, "deployment_id": "dep-2"}
    assert data["outbox"] == {"waiting": 3}
    assert h.snapshot() == before  # read-only


def test_status_with_both_slots_full(config_file: Path, harness: Harness) -> None:
    h = harness
    install_first(h)
    second = h.release(version=2)
    h.install(second)
    lines, data = status(config_file)
    assert lines[2].startswith("slot a    kws v1 int8") and not lines[2].endswith("(active)")
    assert lines[3] == f"slot b    kws v2 int8, model {second.model_sha[:12]}, 300 B (active)"
    assert lines[4] == "committed kws v2 in slot b, installed by dep-2"
    assert lines[5] == "update    idle, deployment dep-2, outcome committed"
    assert data["active_slot"] == "b"
    assert [data["slots"][s]["active"] for s in "ab"] == [False, True]


CORRUPTIONS = [
    # (file to spoil, its new content or None to delete it, the line that says so, the JSON part with an error)
    ("update-record.json", b"{not json", "update    unreadable: ", "update"),
    ("trusted.json", b'{"release_counter": "two"}', "trusted   unreadable: ", "trusted"),
    ("active.json", b"[1, 2]", "committed unreadable: ", "committed"),
    ("slots/a/manifest.json", b"{}", "slot a    unreadable (active) - ", "committed"),
    ("slots/a/model.tflite", None, "slot a    kws v1 int8", "committed"),
]


@pytest.mark.parametrize(("name", "content", "line", "part"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_status_says_which_file_is_corrupt_or_missing_without_a_traceback(
    name: str, content: bytes | None, line: str, part: str, config_file: Path, harness: Harness
) -> None:
    install_first(harness)
    path = harness.data_dir / name
    original = path.read_bytes()
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)

    lines, data = status(config_file)
    path.write_bytes(original)  # for the harness's own check at teardown

    assert any(text.startswith(line) for text in lines), lines
    assert len(lines) == 10  # every other part is still shown
    assert "error" in data[part], data[part]
    if name == "slots/a/model.tflite":
        assert "model.tflite is missing" in lines[2]
        assert data["slots"]["a"]["error"].startswith("model.tflite is missing")
        assert lines[4].startswith("committed kws v1 in slot a, installed by dep-1 - model.tflite is missing")


def test_status_shows_a_half_staged_slot(config_file: Path, harness: Harness) -> None:
    install_first(harness)
    (harness.data_dir / "slots" / "b").mkdir()
    (harness.data_dir / "slots" / "b" / "model.tflite").write_bytes(b"half")
    lines, data = status(config_file)
    assert lines[3] == "slot b    partial - no manifest: a half-staged slot, not a usable model"
    assert data["slots"]["b"]["state"] == "partial"


def test_status_with_a_missing_config_is_one_error_line(tmp_path: Path) -> None:
    result = run("agent", "status", "--config", tmp_path / "nope.toml")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: config file {tmp_path / 'nope.toml'} does not exist"


# -- agent check-config --connect -------------------------------------------------------------------


def config_for(broker_url: str, harness: Harness, tmp_path: Path) -> Path:
    return write_config_toml(tmp_path / "agent.toml", make_config(harness.data_dir, harness.keys,
                                                                  broker_url=broker_url))


def test_check_config_connects_to_a_real_broker(mosquitto: Any, harness: Harness, tmp_path: Path) -> None:
    out = ok(run("agent", "check-config", "--config", config_for(mosquitto.url, harness, tmp_path), "--connect"))
    lines = out.splitlines()
    assert lines[1] == f"broker   {mosquitto.url}"
    assert lines[-2:] == [f"broker   connected to {mosquitto.url}", "config OK"]


def test_check_config_cannot_reach_a_closed_port(harness: Harness, tmp_path: Path) -> None:
    from server.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    result = run("agent", "check-config", "--config", config_for(url, harness, tmp_path), "--connect")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: cannot reach broker {url} (Connection refused)"
    assert f"broker   {url}" in result.stdout and "config OK" not in result.stdout  # the offline checks ran


def test_check_config_names_a_broker_that_refuses(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.broker
    from server.broker import Mosquitto

    monkeypatch.setattr(server.broker, "CONFIG", server.broker.CONFIG.replace("allow_anonymous true",
                                                                              "allow_anonymous false"))
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        result = run("agent", "check-config", "--config", config_for(broker.url, harness, tmp_path), "--connect")
    finally:
        broker.stop()
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: broker {broker.url} refused the connection (Not authorized)"


def test_check_config_without_connect_stays_offline(harness: Harness, tmp_path: Path) -> None:
    out = ok(run("agent", "check-config", "--config", config_for("mqtt://127.0.0.1:1", harness, tmp_path)))
    assert "connected" not in out and out.splitlines()[-1] == "config OK"


# -- the agent run logs at info by default, and says when it cannot reach the broker -------------------


def run_agent_until(config_file: Path, tmp_path: Path, wanted: str, *cli_args: str,
                    env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """Start ``edgefleet [cli_args] agent --config`` as a user would, until ``wanted`` is on its stderr;
    then stop it (SIGTERM) and return everything it logged."""
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k not in ("EDGEFLEET_LOG_LEVEL", "EDGEFLEET_FAILPOINTS")}
    environment.update(env or {})
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgefleet", *cli_args, "agent", "--config", str(config_file)],
                                stdout=out, stderr=subprocess.STDOUT, env=environment)
    try:
        deadline = time.monotonic() + timeout
        while wanted not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the agent exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no {wanted!r} within {timeout:.0f} s:\n{log.read_text()}"
            time.sleep(0.1)
        proc.terminate()
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text(errors="replace")


def test_starting_the_agent_against_a_dead_broker_says_so_at_the_default_level(
    harness: Harness, tmp_path: Path
) -> None:
    from server.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    text = run_agent_until(config_for(url, harness, tmp_path), tmp_path, "retrying in")
    line = next(line for line in text.splitlines() if "cannot reach broker" in line)
    assert line.endswith(f"WARNING shared.mqtt: [kitchen {DEVICE}] cannot reach broker {url} (Connection refused), "
                         "retrying in 2 s")
    assert f"INFO agent.service: [kitchen {DEVICE}] agent kitchen ({DEVICE}) starting" in text  # info by default
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("cli_args", "env"), [(("--log-level", "warning"), {}), ((), {"EDGEFLEET_LOG_LEVEL": "warning"})],
    ids=["option", "environment"],
)
def test_a_chosen_log_level_wins_over_the_agents_info_default(
    cli_args: tuple[str, ...], env: dict[str, str], harness: Harness, tmp_path: Path
) -> None:
    from server.broker import free_port

    config = config_for(f"mqtt://127.0.0.1:{free_port()}", harness, tmp_path)
    text = run_agent_until(config, tmp_path, "cannot reach broker", *cli_args, env=env)
    assert " INFO " not in text


def test_connects_are_logged_at_info_when_the_broker_is_there(
    mosquitto: Any, harness: Harness, tmp_path: Path
) -> None:
    text = run_agent_until(config_for(mosquitto.url, harness, tmp_path), tmp_path, f"connected to {mosquitto.url}")
    assert f"INFO shared.mqtt: [kitchen {DEVICE}] connected to {mosquitto.url}" in text
    assert text.count(f"connected to {mosquitto.url}") == 1  # said once, by the link
    assert "WARNING" not in text


@pytest.mark.parametrize(
    ("args", "env", "level"),
    [
        (["server", "--help"], {}, logging.INFO),  # runs until stopped: info by default
        (["--log-level", "warning", "server", "--help"], {}, logging.WARNING),
        (["server", "--help"], {"EDGEFLEET_LOG_LEVEL": "error"}, logging.ERROR),
        (["agent", "status", "--help"], {}, logging.WARNING),  # a short command stays quiet
        (["model", "--help"], {}, logging.WARNING),
    ],
)
def test_the_default_log_level_depends_on_the_command(
    args: list[str], env: dict[str, str], level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: seen.append(kwargs["level"]))
    monkeypatch.delenv("EDGEFLEET_LOG_LEVEL", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert seen == [level]


def test_a_bad_log_level_in_the_environment_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_LOG_LEVEL", "loud")
    result = CliRunner().invoke(cli, ["agent", "--help"])
    assert result.exit_code == 2 and "Invalid value for '--log-level'" in result.output


def test_status_shows_where_the_running_agent_serves(config_file: Path, harness: Harness) -> None:
    from agent.serving import Serving

    serving = Serving(harness.config, send=lambda report, deployment: None, backlog=lambda: 0)
    serving.start()
    try:
        assert serving.url is not None and serving.url.startswith("http://127.0.0.1:")
        lines, data = status(config_file)
        assert data["serve"] == {"enabled": True, "listen": "127.0.0.1:0", "address": serving.url}
        assert lines[-1] == f"serve     {serving.url} (POST /v1/infer, GET /v1/model, GET /healthz)"
    finally:
        serving.stop()
    assert status(config_file)[1]["serve"]["address"] is None  # a clean stop removes serve.json
