"""A private PostgreSQL for the tests: initdb into a temporary directory, pg_ctl on a free port.

Never the machine's own PostgreSQL: the tests start theirs (installed by
``scripts/bootstrap.sh`` when missing), as they start their own Mosquitto.
PostgreSQL refuses to run as root, so under root the cluster belongs to the
``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from server.broker import free_port, wait_listening

USER = "edgefleet"


def find_pg_bin() -> Path:
    """The directory holding initdb and pg_ctl (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[3]))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (scripts/bootstrap.sh does)")
    return Path(versions[-1]).parent


class PostgresServer:
    """One throwaway cluster. ``durable=False`` (the tests) turns fsync off; benchmarks keep the defaults."""

    def __init__(self, *, durable: bool = False, port: int | None = None) -> None:
        self.bin = find_pg_bin()
        self.port = port or free_port()
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._databases = 0

    def _run(self, *args: str) -> None:
        user = self._owner.pw_name if self._owner else None
        done = subprocess.run(args, user=user, cwd=self.root, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}\n{log}")

    def start(self) -> PostgresServer:
        if not self.data.exists():
            if self._owner:
                os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        if not wait_listening(self.port, lambda: True, 10):
            raise RuntimeError(f"PostgreSQL did not listen on port {self.port}: {self.log.read_text()[-2000:]}")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new empty database (or a copy of ``template``); its SQLAlchemy URL."""
        import psycopg

        self._databases += 1
        name = name or f"t{self._databases}_{os.getpid()}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def kill(self) -> None:
        """Stop at once, as a crash would (the next start recovers from the WAL)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            except RuntimeError:
                time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)
