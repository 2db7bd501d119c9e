"""A private Mosquitto broker on a free port, for the demo and the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from shared.errors import ConfigError, TransportError

# Mosquitto's default max_queued_messages (1000) silently drops QoS 1 messages under load.
# Persistence keeps retained states and the server's queued session across a broker restart;
# autosave bounds what a killed broker loses.
CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {workdir}/
autosave_interval 5
max_queued_messages 100000
max_inflight_messages 100
log_dest file {log}
log_type error
log_type warning
log_type notice
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, alive: Callable[[], bool], timeout: float) -> bool:
    """Poll 127.0.0.1:``port`` until it accepts a connection (True); False as soon as ``alive()`` says the
    process that should listen there is gone, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )
    if found is None:
        raise ConfigError("mosquitto is not installed: apt-get install mosquitto (or see the README)")
    return found


class Mosquitto:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        config = CONFIG.format(port=self.port, log=self.log, workdir=self.workdir)
        if os.geteuid() == 0:  # else Mosquitto becomes "mosquitto", who cannot write its log or data here
            config += "user root\n"
        conf.write_text(config)
        stderr = self.workdir / "mosquitto.stderr"
        with open(stderr, "wb") as err:
            self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err)
        process = self.process
        if wait_listening(self.port, lambda: process.poll() is None, timeout):
            return self
        if process.poll() is not None:
            self.process = None
            said = stderr.read_text(errors="replace").strip() or (self.log.read_text() if self.log.exists() else "")
            raise TransportError(f"mosquitto exited at start: {said}")
        self.stop()
        raise TransportError(f"mosquitto did not listen on port {self.port} within {timeout:.0f} s")

    def kill(self) -> None:
        """Stop the broker the hard way (SIGKILL): what it had not saved yet is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
