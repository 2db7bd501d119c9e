"""Resumable chunked download of one manifest file.

Each chunk is checked against its sha256 from the signed manifest before a
byte is written; progress (which chunks are held) survives restarts in a side
file, so an interrupted download asks only for what is still missing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.files import atomic_write_json, read_json, storage_error
from shared.errors import IntegrityError
from shared.messages import FileEntry


class ChunkAssembler:
    def __init__(self, entry: FileEntry, directory: Path) -> None:
        self.entry = entry
        self.part = directory / f"{entry.sha256}.part"
        self.progress = directory / f"{entry.sha256}.chunks.json"
        self.count = len(entry.chunks)
        self.held: set[int] = set()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if self.part.exists() and self.progress.exists():
                self.held = {i for i in read_json(self.progress) if isinstance(i, int) and 0 <= i < self.count}
            else:
                with open(self.part, "wb") as fh:
                    fh.truncate(entry.size)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError):
                raise storage_error(exc, str(self.part)) from exc
            self.held = set()

    @property
    def complete(self) -> bool:
        return len(self.held) == self.count

    def missing_ranges(self, limit: int = 64) -> list[tuple[int, int]]:
        """Missing chunk indices as [start, end) ranges."""
        ranges: list[tuple[int, int]] = []
        start = None
        for i in range(self.count + 1):
            missing = i < self.count and i not in self.held
            if missing and start is None:
                start = i
            elif not missing and start is not None:
                ranges.append((start, i))
                start = None
                if len(ranges) >= limit:
                    break
        return ranges

    def accept(self, index: int, data: bytes) -> bool:
        """Write one chunk after checking it; False if it was already held or out of range."""
        if index >= self.count or index in self.held:
            return False
        if hashlib.sha256(data).hexdigest() != self.entry.chunks[index]:
            raise IntegrityError(f"{self.entry.name}: chunk {index} does not match its signed sha256")
        try:
            with open(self.part, "r+b") as fh:
                fh.seek(index * self.entry.chunk_size)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            self.held.add(index)
            atomic_write_json(self.progress, sorted(self.held))
        except OSError as exc:
            raise storage_error(exc, str(self.part)) from exc
        return True

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.progress.unlink(missing_ok=True)


def verify_file(path: Path, entry: FileEntry) -> None:
    """Stream-hash a whole file against the manifest's size and sha256."""
    try:
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{entry.name}: size {size} differs from the signed {entry.size}")
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise IntegrityError(f"{entry.name}: cannot read for verification: {exc}") from exc
    if digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{entry.name}: sha256 differs from the signed manifest")
