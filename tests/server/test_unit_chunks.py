"""The chunk server's request windows, driven with a recording publisher and a fake clock."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import chunks as chunks_module
from server.blobs import BlobStore
from server.chunks import ChunkServer
from shared import PROTOCOL_VERSION
from shared.errors import TransportError
from shared.messages import DEFAULT_CHUNK_SIZE, ChunkRequest
from shared.topics import chunk_topic, parse_topic

BLOB = bytes(range(256)) * 2560  # 655,360 bytes: chunks of 262,144 + 262,144 + 131,072
CHUNKS = [BLOB[i : i + DEFAULT_CHUNK_SIZE] for i in range(0, len(BLOB), DEFAULT_CHUNK_SIZE)]
WINDOW = 0.3


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A publish callable that remembers every call, with the fake clock's time."""

    def __init__(self, clock: FakeMonotonic) -> None:
        self.clock = clock
        self.calls: list[tuple[str, bytes, bool]] = []
        self.times: list[float] = []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.calls.append((topic, payload, retain))
        self.times.append(self.clock.now)

    def sent(self) -> list[tuple[str, int]]:
        """(sha256, chunk index) of every publish, in order."""
        topics = [parse_topic(topic) for topic, _, _ in self.calls]
        return [(t.sha256 or "", t.chunk_index or 0) for t in topics]


@pytest.fixture
def clock() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture
def recorder(clock: FakeMonotonic) -> Recorder:
    return Recorder(clock)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "artifacts")


@pytest.fixture
def sha(store: BlobStore) -> str:
    return store.put(BLOB)


@pytest.fixture
def server(store: BlobStore, recorder: Recorder, clock: FakeMonotonic) -> ChunkServer:
    return ChunkServer(store, recorder, window_s=WINDOW, monotonic=clock)


def want(*ranges: tuple[int, int], device: str = "d-1") -> ChunkRequest:
    return ChunkRequest(v=PROTOCOL_VERSION, device_id=device, ranges=ranges)


def indices(recorder: Recorder) -> list[int]:
    return [index for _, index in recorder.sent()]


# -- one window --------------------------------------------------------------------------------


def test_a_request_is_published_when_its_window_closes(
    server: ChunkServer, sha: str, recorder: Recorder, clock: FakeMonotonic
) -> None:
    assert server.serve(sha, want((0, 3))) == 3
    assert recorder.calls == []
    assert server.next_due() == clock.now + WINDOW

    assert server.flush(clock.now + WINDOW - 0.001) == 0
    assert recorder.calls == []

    assert server.flush(clock.now + WINDOW) == 3
    assert recorder.calls == [(chunk_topic(sha, i), CHUNKS[i], False) for i in range(3)]
    assert b"".join(payload for _, payload, _ in recorder.calls) == BLOB
    assert server.next_due() is None
    assert server.pending == 0


def test_requests_within_one_window_share_one_publish(
    server: ChunkServer, sha: str, recorder: Recorder, clock: FakeMonotonic
) -> None:
    assert server.serve(sha, want((0, 3), device="d-1")) == 3
    clock.now += 0.2
    assert server.serve(sha, want((0, 3), device="d-2")) == 0  # already on its way to d-1: d-2 is subscribed too
    clock.now += 0.09
    assert server.serve(sha, want((1, 2), device="d-3")) == 0

    clock.now += 0.01
    assert server.flush() == 3
    assert indices(recorder) == [0, 1, 2]


def test_several_ranges_open_windows_in_request_order(server: ChunkServer, sha: str, recorder: Recorder) -> None:
    assert server.serve(sha, want((2, 3), (0, 1))) == 2
    server.flush(1e9)
    assert indices(recorder) == [2, 0]


# -- late joiners ------------------------------------------------------------------------------


def test_a_request_just_after_a_publish_opens_a_new_window_and_is_served(
    server: ChunkServer, sha: str, recorder: Recorder, clock: FakeMonotonic
) -> None:
    server.serve(sha, want((0, 3), device="d-1"))
    clock.now += WINDOW
    server.flush()
    clock.now += 0.01  # d-2 subscribed just after the broadcast: the old server ignored it for 2 s

    assert server.serve(sha, want((0, 3), device="d-2")) == 3
    assert server.next_due() == pytest.approx(clock.now + WINDOW)
    clock.now += WINDOW
    assert server.flush() == 3

    assert indices(recorder) == [0, 1, 2, 0, 1, 2]


def test_a_request_that_adds_chunks_to_open_windows_waits_only_for_its_own(
    server: ChunkServer, sha: str, recorder: Recorder, clock: FakeMonotonic
) -> None:
    first = clock.now
    server.serve(sha, want((0, 1), device="d-1"))
    clock.now += 0.1
    assert server.serve(sha, want((0, 3), device="d-2")) == 2

    assert server.flush(first + WINDOW) == 1
    assert server.next_due() == pytest.approx(first + 0.1 + WINDOW)
    assert server.flush(first + 0.1 + WINDOW) == 2
    assert indices(recorder) == [0, 1, 2]


# -- several blobs -----------------------------------------------------------------------------


def test_several_blobs_are_served_side_by_side(
    server: ChunkServer, store: BlobStore, sha: str, recorder: Recorder, clock: FakeMonotonic
) -> None:
    other_data = b"another model" * 50_000  # 650,000 bytes: 3 chunks
    other = store.put(other_data)
    server.serve(sha, want((0, 2), device="d-1"))
    server.serve(other, want((0, 3), device="d-2"))
    clock.now += 0.1
    server.serve(sha, want((1, 3), device="d-3"))

    clock.now += WINDOW
    assert server.flush() == 6

    assert recorder.sent() == [(sha, 0), (sha, 1), (other, 0), (other, 1), (other, 2), (sha, 2)]
    by_topic = {topic: payload for topic, payload, _ in recorder.calls}
    assert b"".join(by_topic[chunk_topic(other, i)] for i in range(3)) == other_data


# -- bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [(((1, 100),), [1, 2]), (((3, 10),), []), (((2, 2_000_000_000),), [2]), (((0, 1), (5, 9)), [0])],
)
def test_ranges_past_the_end_are_clipped(
    server: ChunkServer, sha: str, recorder: Recorder, ranges: tuple[tuple[int, int], ...], expected: list[int]
) -> None:
    assert server.serve(sha, want(*ranges)) == len(expected)
    assert server.pending == len(expected)
    server.flush(1e9)
    assert indices(recorder) == expected


def test_a_request_is_capped_in_total_not_per_range(
    server: ChunkServer, sha: str, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunks_module, "MAX_CHUNKS_PER_REQUEST", 2)
    assert server.serve(sha, want((0, 1), (1, 2), (2, 3))) == 2
    server.flush(1e9)
    assert indices(recorder) == [0, 1]


def test_an_empty_blob_is_one_empty_chunk(store: BlobStore, recorder: Recorder, clock: FakeMonotonic) -> None:
    empty = store.put(b"")
    server = ChunkServer(store, recorder, monotonic=clock)

    assert server.serve(empty, want((0, 5))) == 1
    server.flush(1e9)
    assert recorder.calls == [(chunk_topic(empty, 0), b"", False)]


def test_a_blob_not_in_the_store_is_not_served(
    server: ChunkServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    missing = hashlib.sha256(b"never stored").hexdigest()

    with caplog.at_level(logging.WARNING, logger="server.chunks"):
        assert server.serve(missing, want((0, 1))) == 0

    assert server.next_due() is None
    assert server.flush(1e9) == 0
    assert recorder.calls == []
    assert missing in caplog.text


# -- failures while publishing -----------------------------------------------------------------


def test_a_blob_removed_before_its_window_closes_does_not_hold_back_the_others(
    server: ChunkServer, store: BlobStore, sha: str, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    doomed = store.put(b"garbage-collected soon")
    server.serve(doomed, want((0, 1)))
    server.serve(sha, want((0, 3)))
    store.path(doomed).unlink()

    with caplog.at_level(logging.ERROR, logger="server.chunks"):
        assert server.flush(1e9) == 3

    assert recorder.sent() == [(sha, 0), (sha, 1), (sha, 2)]
    assert doomed in caplog.text


def test_a_failed_publish_does_not_hold_back_the_other_chunks(
    store: BlobStore, sha: str, clock: FakeMonotonic, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[str] = []

    def flaky(topic: str, payload: bytes, retain: bool) -> None:
        if topic == chunk_topic(sha, 1):
            raise TransportError("publish failed: out of memory")
        sent.append(topic)

    server = ChunkServer(store, flaky, monotonic=clock)
    server.serve(sha, want((0, 3)))

    with caplog.at_level(logging.ERROR, logger="server.chunks"):
        assert server.flush(1e9) == 2

    assert sent == [chunk_topic(sha, 0), chunk_topic(sha, 2)]
    assert "chunk 1" in caplog.text


def test_the_defaults_are_the_monotonic_clock_and_a_sub_second_window(store: BlobStore, sha: str) -> None:
    calls: list[str] = []
    server = ChunkServer(store, lambda topic, payload, retain: calls.append(topic))
    default: Callable[[], float] = server.monotonic
    assert default is time.monotonic
    assert 0 < server.window_s < 1

    before = time.monotonic()
    server.serve(sha, want((0, 1)))
    due = server.next_due()
    assert due is not None and before + server.window_s <= due <= time.monotonic() + server.window_s


# -- the promise, for any timing ---------------------------------------------------------------

requests = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=1.0),  # seconds since the previous request
        st.integers(min_value=0, max_value=2),  # first chunk
        st.integers(min_value=1, max_value=3),  # how many chunks
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(requests=requests, lateness=st.floats(min_value=0.0, max_value=0.05))
def test_every_request_is_served_within_one_window_and_a_chunk_goes_out_at_most_once_per_window(
    tmp_path_factory: pytest.TempPathFactory, requests: list[tuple[float, int, int]], lateness: float
) -> None:
    store = BlobStore(tmp_path_factory.getbasetemp() / "property-artifacts")
    sha = store.put(BLOB)
    clock = FakeMonotonic()
    recorder = Recorder(clock)
    server = ChunkServer(store, recorder, window_s=WINDOW, monotonic=clock)
    log: list[tuple[str, float, int]] = []  # ("asked" | "sent", time, chunk), in the order it happened

    def run_loop_until(t: float) -> None:
        """What the service loop does: wake when a window is due (``lateness`` late) and flush."""
        while (due := server.next_due()) is not None and due + lateness <= t:
            clock.now = due + lateness
            before = len(recorder.sent())
            server.flush()
            log.extend(("sent", clock.now, index) for _, index in recorder.sent()[before:])
        clock.now = t

    for gap, start, length in requests:
        run_loop_until(clock.now + gap)
        server.serve(sha, want((start, start + length)))
        log.extend(("asked", clock.now, i) for i in range(start, min(start + length, len(CHUNKS))))
    run_loop_until(clock.now + 10 * WINDOW)

    for position, (kind, asked_at, index) in enumerate(log):
        if kind == "asked":
            served = next((t for k, t, i in log[position + 1 :] if k == "sent" and i == index), None)
            assert served is not None and served <= asked_at + WINDOW + lateness + 1e-9
    for index in range(len(CHUNKS)):
        sent_at = [t for kind, t, i in log if kind == "sent" and i == index]
        assert all(later - earlier >= WINDOW - 1e-9 for earlier, later in pairwise(sent_at))
    assert server.pending == 0
