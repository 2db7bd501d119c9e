"""Where a data directory's registry database is.

Precedence, first that is set: the ``--db-url`` option, the ``EDGEFLEET_DB_URL`` environment variable,
the ``database_url`` ``edgefleet init --db-url`` recorded in the data directory's ``server.json``, and
last the SQLite file in the data directory (the embedded default). Keys, artifacts and the broker's
files stay in the data directory whichever database holds the registry.
"""

from __future__ import annotations

import json
import os

from server.db import sqlite_url
from server.db.urls import normalise_database_url, shown
from server.paths import DataDir
from shared.errors import ConfigError, StorageError
from shared.files import atomic_write_bytes

ENV_DB_URL = "EDGEFLEET_DB_URL"
SETTING = "database_url"


def database_url(data_dir: DataDir, given: str | None = None) -> str:
    """The URL of ``data_dir``'s database (normalised; ConfigError for a bad one)."""
    url = given or os.environ.get(ENV_DB_URL) or recorded_database_url(data_dir)
    return normalise_database_url(url) if url else sqlite_url(data_dir.root)


def is_sqlite_file(url: str) -> bool:
    return url.startswith("sqlite:")


def recorded_database_url(data_dir: DataDir) -> str | None:
    """What ``edgefleet init --db-url`` recorded, if anything."""
    try:
        settings = json.loads(data_dir.settings.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {data_dir.settings}: {exc}") from exc
    url = settings.get(SETTING) if isinstance(settings, dict) else None
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"{data_dir.settings}: {SETTING} must be a string")
    return url


def record_database_url(data_dir: DataDir, url: str) -> None:
    """Keep ``url`` in ``server.json`` (mode 0600: it may hold a password), so later commands find it."""
    try:
        settings = json.loads(data_dir.settings.read_text(encoding="utf-8")) if data_dir.settings.exists() else {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {data_dir.settings}: {exc}") from exc
    if not isinstance(settings, dict):
        raise ConfigError(f"{data_dir.settings}: expected a JSON object")
    if settings.get(SETTING) == url:
        return
    settings[SETTING] = url
    try:
        atomic_write_bytes(data_dir.settings, (json.dumps(settings, indent=1) + "\n").encode(), private=True)
    except StorageError as exc:
        raise StorageError(f"cannot record the database URL {shown(url)}: {exc}") from exc
