"""One server per SQLite database: an exclusive lock on a file beside it, held for the server's lifetime.

Several replicas need PostgreSQL (their lease and shared ingest assume a
database every replica reaches over the network); two servers on one SQLite
file would both run the rollout engine's side effects, both serve chunks and
fight over the broker session. ``fcntl.flock`` is released by the kernel when
the process dies, however it dies, so a killed server never leaves a stale
lock; the pid in the file only names the holder in the error.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from shared.errors import ConfigError, StorageError


class SingleServerLock:
    def __init__(self, path: Path, database: Path) -> None:
        self.path = path
        self.database = database
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the server that has it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another edgefleet server (pid {holder}) is running on {self.database}; run several replicas on "
                "PostgreSQL (--db-url)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
