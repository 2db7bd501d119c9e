"""``edgefleet init`` and opening an initialised data directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.blobs import BlobStore
from server.db import Database, open_database
from server.db.models import Profile
from server.keys import SigningKeys, create_keys, load_keys
from server.paths import DataDir
from server.profiles import BUILTIN_PROFILES
from shared.errors import ConfigError, StorageError


@dataclass(frozen=True)
class Workspace:
    """Everything a command needs from a data directory."""

    data_dir: DataDir
    db: Database
    blobs: BlobStore

    def keys(self) -> SigningKeys:
        return load_keys(self.data_dir.keys)


def init_data_dir(root: Path) -> Workspace:
    """Create keys, the database (migrated to head) and the built-in profiles; safe to run twice."""
    data_dir = DataDir(root.resolve())
    try:
        data_dir.root.mkdir(parents=True, exist_ok=True)
        create_keys(data_dir.keys)
        data_dir.blobs.mkdir(exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the data directory {root}: {exc.strerror or exc}") from exc
    db = open_database(data_dir.database_url())
    db.upgrade()
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
    return Workspace(data_dir, db, BlobStore(data_dir.blobs))


def open_workspace(root: Path) -> Workspace:
    data_dir = DataDir(root.resolve())
    if not data_dir.database.exists():
        raise ConfigError(f"{root} is not an edgefleet data directory: run 'edgefleet init --data-dir {root}' first")
    db = open_database(data_dir.database_url())
    if not db.is_initialised():
        raise ConfigError(f"the database in {root} is not up to date: run 'edgefleet init --data-dir {root}'")
    return Workspace(data_dir, db, BlobStore(data_dir.blobs))
