"""Database URLs: the two back-ends edgefleet supports, checked before an engine is made.

SQLite (``sqlite:///path``) is the embedded default; PostgreSQL goes through psycopg 3
(``postgresql+psycopg://user:password@host:port/database``). ``postgresql://`` and
``postgres://`` (what most tools print) mean psycopg 3 here, not SQLAlchemy's psycopg2 default.
"""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from shared.errors import ConfigError

POSTGRESQL = "postgresql+psycopg"
_POSTGRESQL_ALIASES = ("postgresql", "postgres", POSTGRESQL)


def parse_database_url(url: str) -> URL:
    """``url`` as SQLAlchemy understands it, with the PostgreSQL aliases mapped to psycopg 3; ConfigError
    (password hidden) when it is not a URL or names a back-end edgefleet does not support."""
    try:
        parsed = make_url(url.strip())
    except ArgumentError:
        raise ConfigError(f"not a database URL: {_hidden(url)!r} (expected postgresql://USER@HOST:PORT/DATABASE "
                          "or sqlite:///PATH)") from None
    if parsed.drivername in _POSTGRESQL_ALIASES:
        if not parsed.database:
            raise ConfigError(f"{shown(parsed)}: the URL names no database (…/DATABASE at its end)")
        return parsed.set(drivername=POSTGRESQL)
    if parsed.drivername == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(f"{shown(parsed)}: a SQLite URL names a file (sqlite:///PATH)")
        return parsed
    raise ConfigError(f"{shown(parsed)}: unsupported database (edgefleet runs on postgresql:// or sqlite:///)")


def normalise_database_url(url: str) -> str:
    """``parse_database_url`` as a string, password included (for the engine and server.json)."""
    return parse_database_url(url).render_as_string(hide_password=False)


def shown(url: URL | str) -> str:
    """The URL for messages and logs: the password as ``***``."""
    if isinstance(url, str):
        return _hidden(url)
    return url.render_as_string(hide_password=True)


def _hidden(url: str) -> str:
    try:
        return make_url(url.strip()).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>" if "@" in url else url
