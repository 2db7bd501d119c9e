"""Durable file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.canonical import canonical_json, loads_strict
from shared.files import atomic_write_bytes as _atomic_write_bytes
from shared.files import fsync_file, storage_error

__all__ = ["atomic_write_bytes", "atomic_write_json", "fsync_file", "read_json", "storage_error"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``shared.files.atomic_write_bytes`` with a failpoint ``agent.write.<file name>`` between the new bytes
    in the temp file and the rename (the crash tests kill the agent there)."""
    _atomic_write_bytes(path, data, failpoint_name=f"agent.write.{path.name}")


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, canonical_json(value))


def read_json(path: Path) -> Any:
    """Read a file this agent wrote; as strict as the wire (it holds signed documents)."""
    return loads_strict(path.read_bytes())
