"""The registry on both back-ends: migrations, error translation by code, where the database is, and
allocations that stay correct when two transactions race on PostgreSQL (no SQLite write lock there)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy.exc
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from server.db import Database, open_database, queries
from server.db.models import Base, Device, Profile
from server.db_location import ENV_DB_URL, database_url, record_database_url
from server.paths import DataDir
from shared.errors import AlreadyExistsError, ConfigError, StorageError
from tests.pg import PostgresServer


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    opened = open_database(db_url)
    yield opened
    opened.close()


def test_migrations_create_exactly_the_model_schema(db: Database) -> None:
    assert not db.is_initialised()
    db.upgrade()
    db.upgrade()  # idempotent
    assert db.is_initialised()
    # Alembic compares PostgreSQL defaults by asking the server ('{}'::json = '{}'), which json cannot answer.
    defaults = db.engine.dialect.name == "sqlite"
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": defaults})
        assert compare_metadata(context, Base.metadata) == []


def test_two_processes_upgrading_at_once_both_end_at_head(db_url: str) -> None:
    databases = [open_database(db_url) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(d.upgrade) for d in databases]:
                done.result()
        assert all(d.is_initialised() for d in databases)
    finally:
        for d in databases:
            d.close()


def test_a_duplicate_key_is_already_exists(db: Database) -> None:
    db.upgrade()
    with db.session() as session:
        session.add(Profile(name="edge-tpu", quantization="int8"))
    with pytest.raises(AlreadyExistsError) as caught, db.session() as session:
        session.add(Profile(name="edge-tpu", quantization="fp16"))
    assert isinstance(caught.value.__cause__, sqlalchemy.exc.IntegrityError)


def test_an_unreachable_server_is_a_storage_error_without_the_password() -> None:
    db = open_database("postgresql://edgefleet:hunter2@127.0.0.1:1/registry")
    try:
        with pytest.raises(StorageError, match="127.0.0.1:1/registry") as caught:
            db.is_initialised()
        assert "hunter2" not in str(caught.value)
    finally:
        db.close()


@pytest.mark.parametrize("url", ["mysql://u:hunter2@host/db", "not a url", "postgresql://u:hunter2@host",
                                 "sqlite://"])
def test_a_url_edgefleet_cannot_use_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_database(url)
    assert "hunter2" not in str(caught.value)


def test_the_database_url_comes_from_the_option_the_environment_the_data_dir_then_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = DataDir(tmp_path)
    monkeypatch.delenv(ENV_DB_URL, raising=False)
    assert database_url(data_dir) == f"sqlite:///{tmp_path}/edgefleet.db"
    record_database_url(data_dir, "postgresql+psycopg://u:pw@recorded/db")
    assert oct(data_dir.settings.stat().st_mode & 0o777) == "0o600"
    assert database_url(data_dir) == "postgresql+psycopg://u:pw@recorded/db"
    monkeypatch.setenv(ENV_DB_URL, "postgres://u@env/db")
    assert database_url(data_dir) == "postgresql+psycopg://u@env/db"  # the alias means psycopg 3
    assert database_url(data_dir, "postgresql://u@option/db") == "postgresql+psycopg://u@option/db"
    assert json.loads(data_dir.settings.read_text()) == {"database_url": "postgresql+psycopg://u:pw@recorded/db"}


def test_two_transactions_deploying_to_one_device_get_different_sequence_numbers(postgres: PostgresServer) -> None:
    """READ COMMITTED: both read directive_seq 0; a seq counted up in Python would give both 1."""
    db = open_database(postgres.create_database())
    try:
        db.upgrade()
        with db.session() as session:
            session.add(Profile(name="p", quantization="int8"))
            session.add(Device(id="dev-1", name="cam", profile_name="p"))
        both_read = threading.Barrier(2)

        def allocate() -> int:
            with db.session() as session:
                device = session.get(Device, "dev-1")
                assert device is not None and device.directive_seq == 0
                both_read.wait(timeout=10)
                return queries.next_directive_seq(session, device)

        with ThreadPoolExecutor(2) as pool:
            seqs = sorted(pool.map(lambda _: allocate(), range(2)))
        assert seqs == [1, 2]
        with db.session() as session:
            assert session.get(Device, "dev-1").directive_seq == 2  # type: ignore[union-attr]
    finally:
        db.close()


def test_init_records_the_database_and_every_command_then_uses_it(tmp_path: Path, postgres: PostgresServer) -> None:
    from tests.server.test_cli_errors import assert_ok, run

    url = postgres.create_database().replace("postgresql+psycopg://", "postgres://")  # the alias works too
    data = tmp_path / "data"
    assert_ok(run("init", "--data-dir", data, "--db-url", url, "--release-key", "online"))
    assert not (data / "edgefleet.db").exists()
    assert_ok(run("device", "register", "cam", "--profile", "rpi4", "--data-dir", data, "--token"))
    assert "cam" in assert_ok(run("device", "list", "--data-dir", data))
    db = open_database(url)
    try:
        with db.session() as session:
            assert session.query(Device).filter_by(name="cam").count() == 1
    finally:
        db.close()


def test_a_database_that_cannot_be_used_is_one_line_without_the_password(tmp_path: Path,
                                                                        postgres: PostgresServer) -> None:
    from tests.server.test_cli_errors import assert_user_error, run

    data = tmp_path / "data"
    assert_user_error(run("init", "--data-dir", data, "--db-url", "mysql://u:hunter2@h/db"), "unsupported database")
    assert not data.exists()  # refused before anything was written
    assert_ok_init = run("init", "--data-dir", data, "--release-key", "online")
    assert assert_ok_init.exit_code == 0, assert_ok_init.output
    unreachable = "postgresql://edgefleet:hunter2@127.0.0.1:1/registry"
    line = assert_user_error(run("device", "list", "--data-dir", data, "--db-url", unreachable), "127.0.0.1:1/registry")
    assert "hunter2" not in line and "***" in line
    empty = postgres.create_database()
    assert_user_error(run("device", "list", "--data-dir", data, "--db-url", empty), "not initialised", "edgefleet init")
