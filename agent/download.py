"""Resumable chunked download of one manifest file.

Each chunk is checked against its sha256 from the signed manifest before a
byte is written; a copy that does not match is dropped (the caller asks for
it again). Chunks are written in place without an fsync each: the signed
per-chunk digests *are* the progress record, so after a crash or power cut
the chunks on disk are hashed again and exactly those that match count as
held — a chunk the disk lost or half-wrote is simply missing. The whole file
is flushed to disk once, when it is complete.
"""

from __future__ import annotations

import enum
import hashlib
import os
from pathlib import Path

from agent.files import storage_error
from shared.errors import IntegrityError, StorageError
from shared.messages import FileEntry


class ChunkVerdict(enum.Enum):
    STORED = "stored"
    ALREADY_HELD = "already_held"  # a duplicate, or an index past the end: ignored
    CORRUPT = "corrupt"  # does not match its signed sha256: dropped


class ChunkAssembler:
    def __init__(self, entry: FileEntry, directory: Path) -> None:
        self.entry = entry
        self.part = directory / f"{entry.sha256}.part"
        self.count = len(entry.chunks)
        self.held: set[int] = set()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if self.part.exists() and self.part.stat().st_size == entry.size:
                self.held = self._chunks_on_disk()
            else:
                with open(self.part, "wb") as fh:
                    fh.truncate(entry.size)
        except OSError as exc:
            raise storage_error(exc, str(self.part)) from exc

    def _chunks_on_disk(self) -> set[int]:
        """The chunks an earlier run wrote that are intact: each one is hashed against the manifest."""
        held = set()
        with open(self.part, "rb") as fh:
            for index, digest in enumerate(self.entry.chunks):
                if hashlib.sha256(fh.read(self.entry.chunk_size)).hexdigest() == digest:
                    held.add(index)
        return held

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

    def accept(self, index: int, data: bytes) -> ChunkVerdict:
        """Check one chunk against its signed digest and write it; raises StorageError only."""
        if index >= self.count or index in self.held:
            return ChunkVerdict.ALREADY_HELD
        if hashlib.sha256(data).hexdigest() != self.entry.chunks[index]:
            return ChunkVerdict.CORRUPT
        try:
            fd = os.open(self.part, os.O_WRONLY)
            try:
                os.pwrite(fd, data, index * self.entry.chunk_size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise storage_error(exc, str(self.part)) from exc
        self.held.add(index)
        return ChunkVerdict.STORED

    def flush(self) -> None:
        """Make the complete file durable: the one fsync of the download."""
        try:
            fd = os.open(self.part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot flush {self.part}: {exc.strerror or exc}") from exc


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
