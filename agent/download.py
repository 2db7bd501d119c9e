"""Resumable chunked download of a manifest's files.

Each chunk is checked against its sha256 from the signed manifest before a
byte is written; a copy that does not match is dropped (the caller asks for
it again). Chunks are written in place without an fsync each: the signed
per-chunk digests *are* the progress record, so after a crash or power cut
the chunks on disk are hashed again and exactly those that match count as
held — a chunk the disk lost or half-wrote is simply missing. The whole file
is flushed to disk once, when it is complete.

A ``Download`` groups one ``ChunkAssembler`` per missing file with the
request rounds: a round runs from one chunk request to the next. A corrupt
copy is dropped and asked for again soon; the download fails only when
``BARREN_ROUNDS_TO_FAIL`` rounds in a row brought corrupt copies and no good
chunk at all, *and* no good chunk came for a while (``patience_s``: the
server's own copy is bad, not merely slow or restarting), so a stray
publisher on the chunk topic cannot abort a download that is making progress.
"""

from __future__ import annotations

import enum
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.files import fsync_file, storage_error
from shared.errors import IntegrityError
from shared.messages import FileEntry

BARREN_ROUNDS_TO_FAIL = 3
CORRUPT_RETRY_S = 1.0  # how soon a chunk that came corrupt is asked for again
CORRUPT_PATIENCE_REQUESTS = 3  # ... and for how many regular request intervals without a good chunk
PROGRESS_LOG_S = 5.0  # download progress is logged at most this often, and at every quarter
MiB = 1024 * 1024
# Chunks asked for (and subscribed to, one topic each) at a time: 64 MiB at the default chunk size. The
# next window is asked for as soon as this one is in, so a large file costs one request per window.
WANT_WINDOW_CHUNKS = 256


class ChunkVerdict(enum.Enum):
    STORED = "stored"
    ALREADY_HELD = "already_held"  # a duplicate (QoS 1 redelivery, or another device's request): ignored
    OUT_OF_RANGE = "out_of_range"  # an index the signed manifest does not list: dropped
    CORRUPT = "corrupt"  # does not match its signed size and sha256: dropped


class ChunkAssembler:
    def __init__(self, entry: FileEntry, directory: Path) -> None:
        self.entry = entry
        self.part = directory / f"{entry.sha256}.part"
        self.count = len(entry.chunks)
        self.held: set[int] = set()
        self._logged_at = float("-inf")
        self._logged_quarter = 0
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

    def next_window(self, limit: int = WANT_WINDOW_CHUNKS) -> list[int]:
        """The first ``limit`` missing chunk indices: what the next request asks for, and listens for."""
        window: list[int] = []
        for index in range(self.count):
            if index not in self.held:
                window.append(index)
                if len(window) == limit:
                    break
        return window

    def accept(self, index: int, data: bytes) -> ChunkVerdict:
        """Check one chunk against its signed digest and write it; raises StorageError only."""
        if not 0 <= index < self.count:
            return ChunkVerdict.OUT_OF_RANGE
        if index in self.held:
            return ChunkVerdict.ALREADY_HELD
        if len(data) != self.chunk_length(index) or hashlib.sha256(data).hexdigest() != self.entry.chunks[index]:
            return ChunkVerdict.CORRUPT  # a copy of the wrong size is not even hashed
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

    def chunk_length(self, index: int) -> int:
        """How many bytes chunk ``index`` holds: ``chunk_size``, less for the last one."""
        return min(self.entry.chunk_size, self.entry.size - index * self.entry.chunk_size)

    def held_bytes(self) -> int:
        return sum(self.chunk_length(i) for i in self.held)

    def progress(self, now: float) -> str | None:
        """A line such as "1.2/4.8 MiB (25%)" when one is due: at each quarter, at the end, and at most
        every PROGRESS_LOG_S seconds in between; None otherwise."""
        held, size = self.held_bytes(), max(self.entry.size, 1)
        quarter = 4 * held // size
        if quarter <= self._logged_quarter and now - self._logged_at < PROGRESS_LOG_S:
            return None
        self._logged_at, self._logged_quarter = now, max(quarter, self._logged_quarter)
        unit, factor = ("MiB", MiB) if self.entry.size >= MiB else ("KiB", 1024)
        return f"{held / factor:.1f}/{self.entry.size / factor:.1f} {unit} ({100 * held // size}%)"

    def flush(self) -> None:
        """Make the complete file durable: the one fsync of the download."""
        fsync_file(self.part)


def as_ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Ascending chunk indices as [start, end) ranges."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], index + 1)
        else:
            ranges.append((index, index + 1))
    return ranges


@dataclass
class Download:
    assemblers: dict[str, ChunkAssembler]  # by file sha256
    last_request: float = 0.0
    last_progress: float = field(default_factory=time.monotonic)
    stored_this_round: bool = False
    corrupt_this_round: list[str] = field(default_factory=list)
    windows: dict[str, set[int]] = field(default_factory=dict)  # by file: chunks asked for and still missing
    barren_rounds: int = 0  # rounds in a row that brought corrupt copies and nothing good

    @property
    def complete(self) -> bool:
        return all(a.complete for a in self.assemblers.values())

    def next_round(self, now: float, patience_s: float) -> str | None:
        """Close the current request round; returns why the download must fail, if it must."""
        if self.stored_this_round:
            self.barren_rounds = 0
        elif self.corrupt_this_round:
            self.barren_rounds += 1
        corrupt, self.corrupt_this_round, self.stored_this_round = self.corrupt_this_round, [], False
        waited = now - self.last_progress
        if self.barren_rounds >= BARREN_ROUNDS_TO_FAIL and waited >= patience_s:
            return (f"{', '.join(sorted(set(corrupt)))} came only in copies that do not match its signed sha256: "
                    f"{self.barren_rounds} requests in a row over {waited:.0f} s")
        return None


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
