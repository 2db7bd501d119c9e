"""``edgefleet broker`` as a test process: the data directory's own Mosquitto, configured the way a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server.broker import Mosquitto, wait_listening


class FleetBroker(Mosquitto):
    """``edgefleet init`` with TLS on a free loopback port, then ``edgefleet broker`` on it (stopped and killed
    like any ``Mosquitto``)."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        super().__init__(data_dir / "broker", port)
        self.data_dir = data_dir

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "stderr.log"

    def start(self, timeout: float = 15.0) -> FleetBroker:
        with open(self.log, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "broker", "--data-dir", str(self.data_dir), "--listen", self.listen],
                stdout=subprocess.DEVNULL, stderr=err,
            )
        process = self.process
        if wait_listening(self.port, lambda: process.poll() is None, timeout):
            return self
        if process.poll() is not None:
            raise AssertionError(f"edgefleet broker exited: {self.log.read_text(errors='replace')}")
        self.stop()
        raise AssertionError(f"edgefleet broker did not listen on {self.listen} within {timeout:.0f} s")
