"""The registry database: one engine per process, short sessions, an Alembic-managed schema.

Two back-ends: SQLite (one file in the data directory, the embedded default) and
PostgreSQL through psycopg 3 (``server/db/urls.py`` checks the URL first).

Only this package imports SQLAlchemy and Alembic, so it is also the one place
their exceptions are translated (each re-raised ``from`` the original), by type
and error code, never by message text:

* a UNIQUE/PRIMARY KEY violation (SQLSTATE 23505; SQLite's ``SQLITE_CONSTRAINT_UNIQUE`` or
  ``_PRIMARYKEY``) becomes :class:`~shared.errors.AlreadyExistsError`, because callers outside
  ``server/db`` cannot catch a SQLAlchemy exception; other ``IntegrityError``\\ s (foreign key,
  NOT NULL) are programming errors (callers look the referenced row up first and raise
  ``NotFoundError``) and propagate unchanged, as do ``ProgrammingError``\\ s;
* any other database error (locked, disk I/O, not a database, a lost or refused connection, a
  PostgreSQL serialization failure or deadlock) becomes :class:`~shared.errors.StorageError` naming
  the cause; the server's loop retries a batch that failed so;
* a deployment changed by another transaction since this one read it (``StaleDataError``: the
  deployments' ``row_version``, for replicas writing the same row at once) is a ``StorageError``
  too: the batch or engine tick is tried again on fresh data.

Read-modify-write cycles must hold on both: on SQLite every transaction starts with ``BEGIN
IMMEDIATE`` (the CLI and the server share the file: WAL mode, a busy timeout, and the write lock
taken before the first read, so cycles neither lose updates nor fail with an instant "database is
locked"); PostgreSQL runs READ COMMITTED, so such cycles lock the parent row first
(``with_for_update()``, a no-op on SQLite) or are one ``INSERT … ON CONFLICT`` / conditional UPDATE.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import weakref
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
    from sqlalchemy.orm.exc import StaleDataError
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError("the server registry needs SQLAlchemy and Alembic: pip install 'edgefleet[server]'") from error

from server.db.urls import parse_database_url, shown
from shared.errors import AlreadyExistsError, StorageError

__all__ = ["DB_FILENAME", "ConcurrentChange", "Database", "Session", "open_database", "savepoint", "shown", "sqlite_url"]

logger = logging.getLogger(__name__)

DB_FILENAME = "edgefleet.db"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DEFAULT_BUSY_TIMEOUT_MS = 10_000
READ_ONLY = "edgefleet_read_only"  # an execution option: begin without taking SQLite's write lock
# Any 64-bit number of our own: PostgreSQL's lock that makes two processes upgrading at once take turns.
UPGRADE_LOCK = 0x6564676566_6C74  # "edgeflt"
UNIQUE_SQLSTATE = "23505"
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected
SQLITE_UNIQUE = ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{Path(data_dir) / DB_FILENAME}"


def open_database(url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> Database:
    """Create the engine lazily: nothing touches the file or server until the first session or upgrade.
    ConfigError for a URL that is not one of ours (``server/db/urls.py``)."""
    parsed = parse_database_url(url)
    if parsed.drivername == "sqlite":
        engine = create_engine(parsed)
        _configure_sqlite(engine, busy_timeout_ms)
    else:
        # pre_ping: a pooled connection the server dropped (restart, idle timeout) is replaced, not handed out.
        engine = create_engine(parsed, pool_pre_ping=True)
    return Database(engine)


class Database:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        self._where = shown(engine.url)
        # A command that opens the registry and returns without closing it (most CLI commands) still
        # closes its connections when the Database goes away: psycopg warns about a connection left open.
        self._finalizer = weakref.finalize(self, engine.dispose)

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
                    if not sqlite:  # PostgreSQL's DDL is transactional, but two CREATE TABLEs would still race
                        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK})")
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
        self.engine.dispose()  # usable again afterwards: the engine opens new connections

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except exc.IntegrityError as error:
            if is_unique_violation(error.orig):
                raise AlreadyExistsError(f"already exists: {error.orig}") from error
            raise
        except exc.ProgrammingError:
            raise
        except exc.DBAPIError as error:  # OperationalError (locked, connection lost, 40001, 40P01), I/O, ...
            kind = ConcurrentChange if is_concurrency_conflict(error.orig) else StorageError
            raise kind(f"{self._where}: {' '.join(str(error.orig).split())}") from error  # one line
        except StaleDataError as error:
            raise ConcurrentChange(f"{self._where}: changed concurrently, try again ({error})") from error


class ConcurrentChange(StorageError):
    """Another transaction changed a row this one had read (a deployment's ``row_version``), or PostgreSQL
    broke a deadlock by aborting this one: the work is tried again as a whole, on fresh data."""


@contextmanager
def savepoint(session: Session) -> Iterator[None]:
    """``session.begin_nested()``, with a concurrent change to a row it writes raised as ``ConcurrentChange``
    (which must fail the whole transaction, not just this savepoint: the row read before it is stale)."""
    try:
        with session.begin_nested():
            yield
    except StaleDataError as error:
        raise ConcurrentChange(f"changed concurrently, try again ({error})") from error
    except exc.DBAPIError as error:
        if is_concurrency_conflict(error.orig):  # PostgreSQL chose this transaction to break a deadlock
            raise ConcurrentChange(f"{' '.join(str(error.orig).split())}") from error
        raise


def is_concurrency_conflict(orig: BaseException | None) -> bool:
    """A serialization failure or a deadlock (SQLSTATE 40001, 40P01): nothing wrong but the timing."""
    return getattr(orig, "sqlstate", None) in CONFLICT_SQLSTATES


def is_unique_violation(orig: BaseException | None) -> bool:
    """Whether a driver's IntegrityError is a UNIQUE or PRIMARY KEY violation, by its code."""
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg
    if sqlstate is not None:
        return bool(sqlstate == UNIQUE_SQLSTATE)
    errorname = getattr(orig, "sqlite_errorname", None)  # sqlite3 on Python 3.11+
    if errorname is not None:
        return errorname in SQLITE_UNIQUE
    # Python 3.10's sqlite3 names no error: only its message tells (same wording for both constraints).
    return "UNIQUE constraint failed" in str(orig)


def _alembic_config(connection: Connection | None = None) -> Config:
    """Build the config in code so migrations run from an installed wheel without an alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _journal_mode_wal(cursor: Any, busy_timeout_ms: int) -> str:
    """Switch to WAL, waiting out SQLITE_BUSY: when the first connections to a new file race to switch it,
    SQLite may answer "database is locked" at once, without calling the busy handler."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            return str(cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorname", "SQLITE_BUSY") != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from sqlite3's legacy transaction control; _on_begin emits it instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")  # first: switching to WAL may wait
            mode = _journal_mode_wal(cursor, busy_timeout_ms)
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
