"""Content-addressed blob store: ``artifacts/ab/abcdef…`` keyed by sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from shared.errors import NotFoundError, StorageError


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if target.exists():
            return sha256
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot store a blob in {self.root}: {exc.strerror or exc}") from exc
        return sha256

    def put_file(self, path: Path) -> str:
        return self.put(path.read_bytes())

    def read(self, sha256: str) -> bytes:
        """The blob's bytes, checked against its name: a corrupted store is an error, never data."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {sha256} is not in the store") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StorageError(f"blob {sha256} in {self.root} is corrupted (its content no longer matches its name)")
        return data

    def read_chunk(self, sha256: str, index: int, chunk_size: int) -> bytes:
        try:
            with open(self.path(sha256), "rb") as fh:
                fh.seek(index * chunk_size)
                return fh.read(chunk_size)
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {sha256} is not in the store") from exc

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size
