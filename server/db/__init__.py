"""The registry database: one engine per process, short sessions, an Alembic-managed schema.

Only this package imports SQLAlchemy and Alembic, so it is also the one place
their exceptions are translated (each re-raised ``from`` the original):

* a UNIQUE/PRIMARY KEY violation becomes :class:`~shared.errors.AlreadyExistsError`,
  because callers outside ``server/db`` cannot catch a SQLAlchemy exception;
  other ``IntegrityError``\\ s (foreign key, NOT NULL) are programming errors
  (callers look the referenced row up first and raise ``NotFoundError``) and
  propagate unchanged, as do ``ProgrammingError``\\ s;
* any other database error (locked, disk I/O, not a database, ...) becomes
  :class:`~shared.errors.StorageError` naming the cause.

The CLI and the server share one SQLite file, so every SQLite connection runs
in WAL mode with a busy timeout, and every transaction starts with
``BEGIN IMMEDIATE``: the write lock is taken (waiting up to the busy timeout)
before the first read, so read-modify-write cycles neither lose updates nor
fail with an instant "database is locked" when upgrading a read lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import Connection, Engine, create_engine, event, exc
    from sqlalchemy.orm import Session, sessionmaker
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("the server registry needs SQLAlchemy and Alembic: pip install 'edgefleet[server]'") from error

from shared.errors import AlreadyExistsError, StorageError

__all__ = ["DB_FILENAME", "Database", "Session", "open_database", "sqlite_url"]

logger = logging.getLogger(__name__)

DB_FILENAME = "edgefleet.db"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DEFAULT_BUSY_TIMEOUT_MS = 10_000
READ_ONLY = "edgefleet_read_only"  # an execution option: begin without taking SQLite's write lock


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir) / DB_FILENAME}"


def open_database(url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> Database:
    """Create the engine lazily: nothing touches the file until the first session or upgrade."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, busy_timeout_ms)
    return Database(engine)


class Database:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        self._where = engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits when the block succeeds and rolls back when it raises.

        On SQLite even a read-only session holds the write lock from its first query: keep it short.
        """
        with self._translated_errors(), self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only session: on SQLite a plain (deferred) BEGIN, so a reader never waits for the
        write lock (WAL lets it read beside the server's writes) and never holds it. Nothing it changes
        is committed."""
        with self._translated_errors(), self._readers() as session:
            try:
                yield session
            finally:
                session.rollback()

    def upgrade(self) -> None:
        """Migrate the schema to the newest revision; a no-op when it is already there."""
        with self._translated_errors(), self.engine.connect() as conn:
            sqlite = self.engine.dialect.name == "sqlite"
            if sqlite:
                # Batch migrations rebuild tables (create copy, drop, rename); with foreign keys
                # enforced the drop of a referenced table fails. The pragma is ignored inside a
                # transaction, so it goes straight to the driver before BEGIN.
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            try:
                with conn.begin():  # one transaction: a concurrent upgrade waits, then finds head
                    command.upgrade(_alembic_config(conn), "head")
                    if sqlite and (broken := conn.exec_driver_sql("PRAGMA foreign_key_check").all()):
                        raise StorageError(f"{self._where}: migration left dangling foreign keys: {broken}")
            finally:
                if sqlite:
                    conn.invalidate()  # never hand a connection without foreign keys back to the pool

    def is_initialised(self) -> bool:
        """True when the schema is at the newest revision this package ships."""
        with self._translated_errors(), self.engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
        return current == set(ScriptDirectory.from_config(_alembic_config()).get_heads())

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except exc.IntegrityError as error:
            # SQLite reports primary-key and unique violations with the same wording.
            if "UNIQUE constraint failed" in str(error.orig):
                raise AlreadyExistsError(f"already exists: {error.orig}") from error
            raise
        except exc.ProgrammingError:
            raise
        except exc.DatabaseError as error:  # includes OperationalError
            raise StorageError(f"{self._where}: {error.orig}") from error


def _alembic_config(connection: Connection | None = None) -> Config:
    """Build the config in code so migrations run from an installed wheel without an alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from sqlite3's legacy transaction control; _on_begin emits it instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")  # first: switching to WAL may wait
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode not in ("wal", "memory"):
                logger.warning("SQLite refused WAL mode (got %s); concurrent access may fail", mode)
            cursor.execute("PRAGMA foreign_keys=ON")
            # FULL: a commit is on disk when it returns. The server tells agents (and the broker) that a
            # report is stored right after the commit, and they forget it then; NORMAL could lose it.
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")
