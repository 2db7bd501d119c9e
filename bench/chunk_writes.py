"""What receiving a chunk costs the agent's disk: the old scheme against the one that ships.

    python bench/chunk_writes.py [--chunks N] [--dir PATH] [--repeat R]

Each scheme receives the same N chunks of 256 KiB (a model of N/4 MiB) into
a fresh file in ``--dir`` (default: a temporary directory beside this repo,
so on the disk the agent would use here; point it at an SD card on a Pi):

- **before** (issue 6.10): write the chunk and fsync it, then rewrite the
  progress file atomically (temp file, fsync, rename, fsync the directory):
  three fsyncs per chunk;
- **one fsync per chunk**: write and fsync the chunk, no progress file — the
  reference the issue measured (about 9 ms here against 47 ms);
- **now**: ``agent.download.ChunkAssembler`` — each chunk checked against its
  signed digest and written in place without an fsync, one fsync for the whole
  file when it is complete (after a crash the chunks on disk are hashed again);
- **floor**: the sha256 check every scheme does, without touching the disk.

Prints one table: milliseconds per chunk (median of the repeats) and the ratio
against "before" measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.download import ChunkAssembler
from agent.files import atomic_write_json
from bench.tables import markdown_table
from shared.messages import DEFAULT_CHUNK_SIZE, FileEntry, describe_file

Scheme = Callable[[Path, bytes, FileEntry], None]


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i : i + DEFAULT_CHUNK_SIZE] for i in range(0, len(data), DEFAULT_CHUNK_SIZE)]


def write_each_with_fsync(directory: Path, data: bytes, after_each: Callable[[int], None]) -> None:
    part = directory / "model.part"
    with open(part, "wb") as fh:
        fh.truncate(len(data))
    for index, chunk in enumerate(chunks_of(data)):
        hashlib.sha256(chunk).hexdigest()
        with open(part, "r+b") as fh:
            fh.seek(index * DEFAULT_CHUNK_SIZE)
            fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        after_each(index)


def before(directory: Path, data: bytes, entry: FileEntry) -> None:
    held: list[int] = []

    def save_progress(index: int) -> None:
        held.append(index)
        atomic_write_json(directory / "model.chunks.json", held)

    write_each_with_fsync(directory, data, save_progress)


def fsync_each(directory: Path, data: bytes, entry: FileEntry) -> None:
    write_each_with_fsync(directory, data, lambda index: None)


def hash_only(directory: Path, data: bytes, entry: FileEntry) -> None:
    for chunk in chunks_of(data):
        hashlib.sha256(chunk).hexdigest()


def now(directory: Path, data: bytes, entry: FileEntry) -> None:
    assembler = ChunkAssembler(entry, directory)
    for index, chunk in enumerate(chunks_of(data)):
        assembler.accept(index, chunk)
    assembler.flush()


SCHEMES: list[tuple[str, str, Scheme]] = [  # name, fsyncs per chunk, scheme
    ("before: chunk fsync + atomic progress file", "3", before),
    ("one write + fsync per chunk", "1", fsync_each),
    ("now: in place, one fsync per file", "1/N", now),
    ("floor: the sha256 check alone, no disk", "0", hash_only),
]


def measure(scheme: Scheme, root: Path, data: bytes, entry: FileEntry) -> float:
    with tempfile.TemporaryDirectory(dir=root) as work:
        start = time.perf_counter()
        scheme(Path(work), data, entry)
        return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=64, help="chunks of 256 KiB per run [64: a 16 MiB model]")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    data = os.urandom(args.chunks * DEFAULT_CHUNK_SIZE)
    entry = describe_file("model.tflite", "model", data)  # the signed manifest's entry, known before any chunk
    runs: dict[str, list[float]] = {name: [] for name, _, _ in SCHEMES}
    for _ in range(args.repeat):  # interleaved, so a noisy moment hurts every scheme alike
        for name, _, scheme in SCHEMES:
            runs[name].append(measure(scheme, args.dir, data, entry) / args.chunks)
    baseline = statistics.median(runs[SCHEMES[0][0]])
    print(f"{args.chunks} chunks of 256 KiB in {args.dir}, median of {args.repeat} runs; ratio against 'before'")
    print()
    rows = []
    for name, fsyncs, _ in SCHEMES:
        median = statistics.median(runs[name])
        rows.append([name, fsyncs, f"{median:.2f}", f"{min(runs[name]):.2f}", f"{max(runs[name]):.2f}",
                     f"{median / baseline:.2f}x"])
    print(markdown_table(["scheme", "fsyncs per chunk", "ms per chunk", "min", "max", "vs before"], rows))

if __name__ == "__main__":
    main()
