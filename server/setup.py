"""``edgefleet init`` and opening an initialised data directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from server.blobs import BlobStore
from server.db import Database, open_database, shown, sqlite_url
from server.db.models import Profile
from server.db.urls import parse_database_url
from server.db_location import database_url, is_sqlite_file, record_database_url, recorded_database_url
from server.keys import KeySetup, ReleaseKeyMode, SigningKeys, load_keys, setup_keys
from server.paths import DataDir
from server.profiles import BUILTIN_PROFILES
from shared.errors import ConfigError, StorageError

BLOB_DIR_ENV = "EDGEFLEET_BLOB_DIR"  # the artifact store instead of DATA_DIR/artifacts (shared by replicas)


def blob_dir(data_dir: DataDir, configured: Path | None = None) -> Path:
    """``configured``, else $EDGEFLEET_BLOB_DIR, else the data directory's ``artifacts``: every replica and
    command must see the same store."""
    configured = configured or (Path(os.environ[BLOB_DIR_ENV]) if os.environ.get(BLOB_DIR_ENV) else None)
    return Path(configured).resolve() if configured else data_dir.blobs


@dataclass(frozen=True)
class Workspace:
    """Everything a command needs from a data directory."""

    data_dir: DataDir
    db: Database
    blobs: BlobStore
    key_setup: KeySetup | None = None  # what init found or made (None when only opened)

    def keys(self) -> SigningKeys:
        return load_keys(self.data_dir.keys)


def init_data_dir(
    root: Path, *, release_key: ReleaseKeyMode | None = None, release_key_out: Path | None = None,
    new_release_key: ReleaseKeyMode = ReleaseKeyMode.ONLINE, db_url: str | None = None,
) -> Workspace:
    """Create keys, the root of trust, the database (migrated to head) and the built-in profiles; safe to
    run twice. ``release_key``: where the release private key lives (None: as it already does, or
    ``new_release_key`` for a new directory; ``edgefleet init`` makes that offline, tests and the demo
    keep it online); offline, it is written to ``release_key_out`` and never into the data directory.
    ``db_url``: the database (``server/db_location.py``); one other than the SQLite file in the data
    directory is recorded there, so later commands find it without being told."""
    data_dir = DataDir(root.resolve())
    if db_url:
        parse_database_url(db_url)  # a bad URL fails before anything is written
    try:
        data_dir.root.mkdir(parents=True, exist_ok=True)
        key_setup = setup_keys(data_dir.keys, release_key, release_key_out, default=new_release_key)
        blob_dir(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the data directory {root}: {exc.strerror or exc}") from exc
    url = database_url(data_dir, db_url)
    db = open_database(url)
    db.upgrade()
    if url != sqlite_url(data_dir.root) or recorded_database_url(data_dir) is not None:
        record_database_url(data_dir, url)  # a no-op when it is recorded already
    with db.session() as session:
        for builtin in BUILTIN_PROFILES:
            profile = session.get(Profile, builtin.name) or Profile(name=builtin.name)
            profile.quantization = builtin.quantization
            profile.quantizations = ",".join(builtin.quantizations)
            profile.threads = builtin.threads
            profile.description = builtin.description
            profile.objective = builtin.objective
            profile.accuracy_budget = builtin.accuracy_budget
            profile.max_model_bytes = builtin.max_model_bytes
            profile.max_ram_bytes = builtin.max_ram_bytes
            profile.recipe = builtin.recipe
            profile.builtin = True
            session.add(profile)
    return Workspace(data_dir, db, BlobStore(blob_dir(data_dir)), key_setup)


def open_workspace(root: Path, *, db_url: str | None = None, blobs: Path | None = None) -> Workspace:
    """An initialised data directory and its database (``db_url``: as ``--db-url`` gave it, if it did;
    ``blobs``: the artifact store, when not the data directory's, see ``blob_dir``)."""
    data_dir = DataDir(root.resolve())
    url = database_url(data_dir, db_url)
    init = f"edgefleet init --data-dir {root}" + (f" --db-url {shown(url)}" if db_url else "")
    on_file = is_sqlite_file(url)
    present = Path(parse_database_url(url).database or "").exists() if on_file else data_dir.keys.is_dir()
    if not present:
        raise ConfigError(f"{root} is not an edgefleet data directory: run '{init}' first")
    db = open_database(url)
    if not db.is_initialised():  # on PostgreSQL also an empty database
        db.close()
        where = f"in {root}" if on_file else f"at {shown(url)}"
        raise ConfigError(f"the database {where} is not initialised or not up to date: run '{init}'")
    return Workspace(data_dir, db, BlobStore(blob_dir(data_dir, blobs)))
