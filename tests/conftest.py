"""Fixtures shared by every tier: a private Mosquitto, a private PostgreSQL and the digits model.

The server and end-to-end tests that touch the registry run on both back-ends: a test (or fixture) that
asks for ``db_backend`` runs twice, ``[sqlite]`` and ``[postgresql]``. One PostgreSQL cluster
(``tests/pg.py``) serves the whole session, started the first time a test needs it; every test gets a
database of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.pg import PostgresServer

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("EDGEFLEET_DB_URL", None)  # the tests say which database they use; CLI subprocesses inherit this

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL on a free port (never the machine's own), started on first use."""
    from tests.pg import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    """The registry's back-end: tests that depend on it run once per back-end."""
    return str(request.param)


@pytest.fixture
def db_url(db_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database of the test's back-end: a SQLite file in tmp_path or a new PostgreSQL database."""
    if db_backend == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[object]:
    """A real Mosquitto (MQTT 5) on a free port, for this test only."""
    from server.broker import Mosquitto

    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def digits_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A digits CNN trained once per session: (digits.keras, digits-eval.npz)."""
    from server.compress.digits import write_demo_inputs

    return write_demo_inputs(tmp_path_factory.mktemp("digits"))
