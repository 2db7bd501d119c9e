"""One server per SQLite database: a second ``edgefleet server`` on the same data directory refuses to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server.server_lock import SingleServerLock
from server.setup import init_data_dir
from tests.e2e.fleet import wait_for

# Nothing listens there: the first server keeps retrying its broker, and runs meanwhile.
NO_BROKER = "mqtt://127.0.0.1:9"


def server(data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "server", "--data-dir", str(data_dir), "--broker", NO_BROKER,
             "--http", "off"],
            stdout=out, stderr=subprocess.STDOUT,
        )


def test_a_second_server_on_one_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir).db.close()
    first = server(data_dir, tmp_path / "first.log")
    try:
        wait_for(lambda: (data_dir / "server.lock").exists() and (data_dir / "server.lock").read_text().strip(),
                 60, "the first server to take the lock")
        second = subprocess.run(
            [sys.executable, "-m", "edgefleet", "server", "--data-dir", str(data_dir), "--broker", NO_BROKER,
             "--http", "off"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert second.returncode != 0
        assert (f"another edgefleet server (pid {first.pid}) is running on {data_dir.resolve() / 'edgefleet.db'}; "
                "run several replicas on PostgreSQL (--db-url)") in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, (tmp_path / "first.log").read_text()
    finally:
        first.kill()  # SIGKILL: the kernel drops the lock with the process
        first.wait(15)
    # a killed server leaves no stale lock behind
    lock = SingleServerLock(data_dir / "server.lock", data_dir / "edgefleet.db")
    lock.acquire()
    lock.release()


def test_the_lock_is_released_when_its_holder_lets_go(tmp_path: Path) -> None:
    first = SingleServerLock(tmp_path / "server.lock", tmp_path / "edgefleet.db")
    first.acquire()
    first.release()
    second = SingleServerLock(tmp_path / "server.lock", tmp_path / "edgefleet.db")
    second.acquire()
    second.release()
