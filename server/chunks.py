"""Serving artifact chunks: agents ask for ranges, the server broadcasts each chunk once per window.

Chunks go to ``ef/v1/artifacts/{sha256}/chunks/{i}``, where every agent that
downloads the same file listens. An agent subscribes to that filter before it
publishes its request, on the same connection, so the broker routes to it any
chunk published after the server received the request. Hence the first request
for a chunk opens a short window, every request for that chunk that arrives
before the window closes is served by the one publish at its close, and a
request after that opens a new window. No request is ever dropped as a
duplicate (the agent would wait for its next re-ask, seconds later), and a
wave whose devices ask within a window or two costs one or two copies of the
artifact instead of one per device.

The service registers requests with ``serve``, and its loop wakes at
``next_due`` to ``flush``. Open windows are bounded by the chunks of the blobs
the service lets through (only files a release names) and each request by
``MAX_CHUNKS_PER_REQUEST``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator

from server.blobs import BlobStore
from shared.errors import EdgefleetError
from shared.messages import DEFAULT_CHUNK_SIZE, ChunkRequest
from shared.topics import chunk_topic

logger = logging.getLogger(__name__)

MAX_CHUNKS_PER_REQUEST = 4096
# Long enough to gather a wave's devices (they ask within a fraction of a second of
# each other), short enough that a lone device barely notices.
DEFAULT_WINDOW_S = 0.3


def requested_indices(ranges: tuple[tuple[int, int], ...], count: int, limit: int) -> Iterator[int]:
    """The chunk indices ``ranges`` name within a blob of ``count`` chunks, at most ``limit`` of them."""
    remaining = limit
    for start, end in ranges:
        stop = min(end, count, start + remaining)
        if stop <= start:
            continue
        yield from range(start, stop)
        remaining -= stop - start
        if remaining == 0:
            return


class ChunkServer:
    def __init__(
        self,
        blobs: BlobStore,
        publish: Callable[[str, bytes, bool], None],
        *,
        window_s: float = DEFAULT_WINDOW_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.blobs = blobs
        self.publish = publish
        self.window_s = window_s
        self.monotonic = monotonic
        # Every window lasts window_s on a monotonic clock, so opening order is closing
        # order: a FIFO of (due, sha256, index), and the set of chunks it holds.
        self._windows: deque[tuple[float, str, int]] = deque()
        self._open: set[tuple[str, int]] = set()

    @property
    def pending(self) -> int:
        """How many chunk windows are open (requested, not yet published)."""
        return len(self._open)

    def serve(self, sha256: str, request: ChunkRequest) -> int:
        """Register a request for chunks of a servable blob; returns how many windows it opened.

        Chunks whose window is already open need nothing: its publish will reach
        this requester too.
        """
        count = self._chunk_count(sha256, request.device_id)
        if count is None:
            return 0
        due = self.monotonic() + self.window_s
        opened = 0
        for index in requested_indices(request.ranges, count, MAX_CHUNKS_PER_REQUEST):
            if (sha256, index) not in self._open:
                self._open.add((sha256, index))
                self._windows.append((due, sha256, index))
                opened += 1
        return opened

    def next_due(self) -> float | None:
        """When the earliest open window closes (on ``monotonic``'s clock), or None."""
        return self._windows[0][0] if self._windows else None

    def flush(self, now: float | None = None) -> int:
        """Publish every chunk whose window has closed; returns how many were published."""
        now = self.monotonic() if now is None else now
        published = 0
        while self._windows and self._windows[0][0] <= now:
            _, sha256, index = self._windows.popleft()
            self._open.discard((sha256, index))
            published += self._publish_chunk(sha256, index)
        return published

    def _chunk_count(self, sha256: str, device_id: str) -> int | None:
        try:
            size = self.blobs.size(sha256)
        except FileNotFoundError:
            logger.warning("device %s asked for blob %s which is not in the store", device_id, sha256)
            return None
        return max(1, -(-size // DEFAULT_CHUNK_SIZE))

    def _publish_chunk(self, sha256: str, index: int) -> int:
        # One unreadable blob or failed publish must not hold back the other due chunks;
        # the agents that asked re-ask for what they still miss.
        try:
            data = self.blobs.read_chunk(sha256, index, DEFAULT_CHUNK_SIZE)
            self.publish(chunk_topic(sha256, index), data, False)
        except (EdgefleetError, OSError) as exc:
            logger.error("could not send chunk %d of %s: %s", index, sha256, exc)
            return 0
        return 1
