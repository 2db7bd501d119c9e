"""Durable file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from shared.canonical import canonical_json, loads_strict
from shared.errors import StorageError


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"disk full while writing {what}")
    return StorageError(f"cannot write {what}: {exc.strerror or exc}")


def fsync_file(path: Path) -> None:
    """Make a file's contents durable (its directory entry is made durable when the file is renamed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(exc, str(path)) from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(exc, str(path)) from exc


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, canonical_json(value))


def read_json(path: Path) -> Any:
    """Read a file this agent wrote; as strict as the wire (it holds signed documents)."""
    return loads_strict(path.read_bytes())
