"""The registry database: migrations match the models, SQLite is safe to share, errors are translated."""

from __future__ import annotations

import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy.exc
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select

from server.db import DB_FILENAME, Database, open_database, sqlite_url
from server.db.models import Base, Profile
from shared.errors import AlreadyExistsError, StorageError


@pytest.fixture
def opened() -> Iterator[list[Database]]:
    """Databases a test opens; all closed afterwards so no connection outlives the test."""
    databases: list[Database] = []
    yield databases
    for db in databases:
        db.close()


def _open(opened: list[Database], data_dir: Path, **kwargs: int) -> Database:
    db = open_database(sqlite_url(data_dir), **kwargs)
    opened.append(db)
    return db


def test_sqlite_url_points_into_the_data_dir(tmp_path: Path) -> None:
    assert sqlite_url(tmp_path) == f"sqlite:///{tmp_path}/{DB_FILENAME}"


def test_migrations_create_exactly_the_model_schema(tmp_path: Path, opened: list[Database]) -> None:
    db = _open(opened, tmp_path)
    db.upgrade()
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_idempotent(tmp_path: Path, opened: list[Database]) -> None:
    db = _open(opened, tmp_path)
    assert not db.is_initialised()
    db.upgrade()
    with db.session() as session:
        session.add(Profile(name="kept", quantization="int8"))
    db.upgrade()
    assert db.is_initialised()
    with db.session() as session:
        assert session.get(Profile, "kept") is not None


def test_connections_use_wal_and_enforce_foreign_keys(tmp_path: Path, opened: list[Database]) -> None:
    db = _open(opened, tmp_path)
    db.upgrade()
    with db.engine.connect() as conn:
        pragmas = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in ("journal_mode", "foreign_keys")}
    assert pragmas == {"journal_mode": "wal", "foreign_keys": 1}


def test_two_databases_on_one_file_write_concurrently(tmp_path: Path, opened: list[Database]) -> None:
    # The CLI and the server are separate processes, each with its own engine; two engines
    # in two threads exercise the same SQLite file locking. Both also upgrade at start.
    writers = [_open(opened, tmp_path), _open(opened, tmp_path)]
    start = threading.Barrier(len(writers))

    def write(index: int) -> None:
        db = writers[index]
        start.wait()
        db.upgrade()
        for n in range(50):
            with db.session() as session:
                session.add(Profile(name=f"w{index}-{n}", quantization="int8"))
                # Read-modify-write: needs the write lock before the read, or updates get lost.
                counter = session.get(Profile, "counter")
                if counter is None:
                    session.add(Profile(name="counter", quantization="none", threads=1))
                else:
                    counter.threads += 1

    with ThreadPoolExecutor(len(writers)) as pool:
        for future in [pool.submit(write, index) for index in range(len(writers))]:
            future.result()  # re-raises a "database is locked" from the thread

    with writers[0].session() as session:
        assert session.scalar(select(func.count()).select_from(Profile)) == 101
        assert session.get(Profile, "counter").threads == 100  # type: ignore[union-attr]


def test_session_commits_on_success_and_rolls_back_on_exception(tmp_path: Path, opened: list[Database]) -> None:
    db = _open(opened, tmp_path)
    db.upgrade()
    with db.session() as session:
        session.add(Profile(name="committed", quantization="int8"))
    with pytest.raises(RuntimeError, match="boom"), db.session() as session:
        session.add(Profile(name="rolled-back", quantization="int8"))
        session.get(Profile, "committed").threads = 8  # type: ignore[union-attr]
        session.flush()  # the rows reach the database; only the rollback removes them
        raise RuntimeError("boom")

    with db.session() as session:
        assert session.get(Profile, "rolled-back") is None
        assert session.get(Profile, "committed").threads == 1  # type: ignore[union-attr]


def test_duplicate_key_is_already_exists(tmp_path: Path, opened: list[Database]) -> None:
    db = _open(opened, tmp_path)
    db.upgrade()
    with db.session() as session:
        session.add(Profile(name="edge-tpu", quantization="int8"))
    with pytest.raises(AlreadyExistsError, match="profiles.name") as caught, db.session() as session:
        session.add(Profile(name="edge-tpu", quantization="fp16"))
    assert isinstance(caught.value.__cause__, sqlalchemy.exc.IntegrityError)


def test_locked_database_is_storage_error(tmp_path: Path, opened: list[Database]) -> None:
    db = _open(opened, tmp_path, busy_timeout_ms=50)
    db.upgrade()
    holder = sqlite3.connect(tmp_path / DB_FILENAME, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="database is locked"), db.session() as session:
            session.get(Profile, "any")
    finally:
        holder.close()


def _garbage_file(data_dir: Path) -> Path:
    (data_dir / DB_FILENAME).write_bytes(random.Random(0).randbytes(8192))
    return data_dir


def _missing_directory(data_dir: Path) -> Path:
    return data_dir / "does-not-exist"


def _directory_is_a_file(data_dir: Path) -> Path:
    # Stands in for an unwritable directory: chmod does not stop root, and CI may run as root.
    (data_dir / "data").write_text("a file, not a directory")
    return data_dir / "data"


@pytest.mark.parametrize(
    ("make_data_dir", "cause"),
    [
        (_garbage_file, "file is not a database"),
        (_missing_directory, "unable to open database file"),
        (_directory_is_a_file, "unable to open database file"),
    ],
)
def test_unusable_file_is_storage_error(
    tmp_path: Path, opened: list[Database], make_data_dir: Callable[[Path], Path], cause: str
) -> None:
    db = _open(opened, make_data_dir(tmp_path))
    with pytest.raises(StorageError, match=cause) as caught:
        db.upgrade()
    assert isinstance(caught.value.__cause__, sqlalchemy.exc.DatabaseError)
    with pytest.raises(StorageError, match=cause):
        db.is_initialised()
    with pytest.raises(StorageError, match=cause), db.session() as session:
        session.get(Profile, "any")


def test_a_reader_neither_waits_for_nor_blocks_a_writer(tmp_path: Path, opened: list[Database]) -> None:
    """``rollout status`` while the server commits: a read-only session never takes SQLite's write lock."""
    from sqlalchemy import text

    writer_db = _open(opened, tmp_path)
    writer_db.upgrade()
    reader_db = _open(opened, tmp_path, busy_timeout_ms=100)
    with writer_db.session() as writer:  # holds the write lock for the whole block
        writer.execute(text("INSERT INTO audit_events (ts, kind, actor, message, data) "
                            "VALUES ('2026-01-01', 'k', 'a', 'm', '{}')"))
        with reader_db.reading() as reader:  # would time out after 100 ms with BEGIN IMMEDIATE
            assert reader.execute(text("SELECT count(*) FROM audit_events")).scalar() == 0
            with pytest.raises(StorageError, match="locked"), reader_db.session() as blocked:
                blocked.execute(text("SELECT 1"))  # a writing session does wait, and gives up
