"""Serving artifact chunks: agents ask for ranges, the server broadcasts each chunk once.

Chunks go to ``ef/v1/artifacts/{sha256}/chunks/{i}``, where every agent that
downloads the same file listens; a chunk sent moments ago is not sent again
for the next device that asks, so a wave costs about one artifact of egress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.blobs import BlobStore
from shared.errors import NotFoundError, StorageError
from shared.messages import DEFAULT_CHUNK_SIZE, ChunkRequest
from shared.topics import chunk_topic

logger = logging.getLogger(__name__)

MAX_CHUNKS_PER_REQUEST = 4096


class ChunkServer:
    def __init__(
        self,
        blobs: BlobStore,
        publish: Callable[[str, bytes, bool], None],
        *,
        resend_after_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.blobs = blobs
        self.publish = publish
        self.resend_after_s = resend_after_s
        self.monotonic = monotonic
        self._sent: dict[tuple[str, int], float] = {}

    def serve(self, sha256: str, request: ChunkRequest) -> int:
        """Publish the requested chunks of a servable blob; returns how many were sent."""
        try:
            size = self.blobs.size(sha256)
        except FileNotFoundError:
            logger.warning("device %s asked for blob %s which is not in the store", request.device_id, sha256)
            return 0
        count = max(1, -(-size // DEFAULT_CHUNK_SIZE))
        now = self.monotonic()
        sent = 0
        for start, end in request.ranges:
            for index in range(start, min(end, count, start + MAX_CHUNKS_PER_REQUEST)):
                key = (sha256, index)
                if now - self._sent.get(key, -1e9) < self.resend_after_s:
                    continue
                try:
                    data = self.blobs.read_chunk(sha256, index, DEFAULT_CHUNK_SIZE)
                except (NotFoundError, OSError) as exc:
                    raise StorageError(f"cannot read chunk {index} of {sha256}: {exc}") from exc
                self.publish(chunk_topic(sha256, index), data, False)
                self._sent[key] = now
                sent += 1
        if len(self._sent) > 100_000:
            self._sent = {k: t for k, t in self._sent.items() if now - t < self.resend_after_s}
        return sent
