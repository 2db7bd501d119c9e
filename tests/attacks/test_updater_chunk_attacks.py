"""Attacks on the artifact chunks: anyone on the path of ``ef/v1/artifacts/{sha256}/chunks/{i}``.

Every chunk is checked against its size and sha256 in the signed manifest
before a byte is written (``agent/download.py``); a copy that does not match
is dropped and asked for again, an index the manifest does not list is
dropped, a chunk of a file no download wants is ignored. A download fails
only when nothing but bad copies came for a while (the server's own copy is
bad), so a stray publisher cannot abort one that makes progress. Each case
starts with release 1 installed and release 2 accepted (its metadata is
genuine, so trust moved before the attack), its chunks on their way.
"""

from __future__ import annotations

import pytest

from agent.download import CORRUPT_RETRY_S
from agent.states import State
from shared.messages import UpdateState
from shared.topics import chunk_topic
from tests.agent.fakes import install_first
from tests.agent.material import REQUEST_INTERVAL, Release, chunk_of, payload, sha256_hex
from tests.attacks.harness import AttackHarness, assert_attack_refused

MODEL_CHUNKS = 5  # release 2's model: 300 bytes in 64-byte chunks


@pytest.fixture
def downloading(harness: AttackHarness) -> Release:
    install_first(harness)
    release = harness.release(version=2)
    harness.updater.offer(release.desired)
    assert harness.updater.state is State.DOWNLOADING
    return release


def reverse(data: bytes) -> bytes:
    return data[::-1]


def rounds_until_the_download_ends(h: AttackHarness) -> int:
    """Answer each re-request (the agent's tick) with tampered copies until the download ends; returns how
    many rounds it took."""
    rounds = 0
    while True:
        h.mono.advance(CORRUPT_RETRY_S)
        h.updater.tick()
        if h.updater.state is not State.DOWNLOADING:
            return rounds
        rounds += 1
        h.pump(tamper=lambda sha, index, data: reverse(data))


def test_chunk_bytes_altered_in_flight(harness: AttackHarness, downloading: Release) -> None:
    """Every copy of one chunk altered (a man in the middle, or a bad copy in the server's store): asked
    for again every second, it fails the download once three request intervals (15 s) brought nothing
    else; the previous model serves on."""
    release = downloading

    def alter(h: AttackHarness) -> None:
        # The first round brings every other chunk: progress, so its corrupt copy does not count.
        h.pump(tamper=lambda sha, index, data: reverse(data) if sha == release.model_sha and index == 4 else data)
        started = h.mono.now
        rounds_until_the_download_ends(h)
        assert h.mono.now - started == pytest.approx(3 * REQUEST_INTERVAL)
        assert h.reporter.final()[:2] == (release.deployment_id, UpdateState.FAILED)

    assert_attack_refused(harness, alter, "model.tflite chunk 4 came only in copies that do not match its signed "
                          "sha256: 14 requests in a row over 15 s")


def test_endless_data(harness: AttackHarness, downloading: Release) -> None:
    """More data than the manifest declares: the last chunk runs on for a megabyte and chunks past the end
    keep coming. Nothing past the signed size is written; the download ends, failed."""
    release = downloading
    part = harness.data_dir / "downloads" / f"{release.model_sha}.part"

    def endless(h: AttackHarness) -> None:
        def pad(sha: str, index: int, data: bytes) -> bytes:
            return data + bytes(1 << 20) if sha == release.model_sha and index == MODEL_CHUNKS - 1 else data

        h.pump(tamper=pad)
        for index in range(MODEL_CHUNKS, MODEL_CHUNKS + 4):
            h.deliver(chunk_topic(release.model_sha, index), payload(f"more-{index}", 64))
        assert part.stat().st_size == release.manifest.file("model").size
        while h.updater.state is State.DOWNLOADING:
            h.mono.advance(CORRUPT_RETRY_S)
            h.updater.tick()
            h.pump(tamper=pad)

    assert_attack_refused(harness, endless, "model.tflite chunk 4 came only in copies that do not match its signed "
                          "sha256: 14 requests in a row over 15 s")


def test_chunk_index_out_of_range(harness: AttackHarness, downloading: Release) -> None:
    """Chunk 5 of a file of chunks 0 to 4: past the signed end, wherever its bytes would land."""
    release = downloading
    attack = chunk_of(release.model, MODEL_CHUNKS - 1)  # genuine bytes, at the index after them
    assert_attack_refused(harness, lambda h: h.deliver(chunk_topic(release.model_sha, MODEL_CHUNKS), attack),
                          "dropped model.tflite chunk 5: the signed manifest lists chunks 0 to 4")


def test_negative_chunk_index(harness: AttackHarness, downloading: Release) -> None:
    """Behind the topic grammar (below), the updater checks the range itself: chunk -1 with the genuine bytes
    of the last chunk used to pass its digest check (Python counts from the end) and fail the whole
    download writing at offset -64."""
    release = downloading
    last = chunk_of(release.model, MODEL_CHUNKS - 1)
    assert_attack_refused(harness, lambda h: h.updater.on_chunk(release.model_sha, -1, last),
                          "dropped model.tflite chunk -1: the signed manifest lists chunks 0 to 4")


@pytest.mark.parametrize("index", ["-1", "1000000000", "007", "1e3"])
def test_chunk_index_outside_the_topic_grammar(harness: AttackHarness, downloading: Release, index: str) -> None:
    """An index that is not a plain decimal below 10^9 is not a chunk topic at all."""
    topic = f"ef/v1/artifacts/{downloading.model_sha}/chunks/{index}"
    assert_attack_refused(harness, lambda h: h.deliver(topic, chunk_of(downloading.model, 0)),
                          f"dropped a malformed message on {topic}: unknown topic '{topic}'")


def test_chunk_for_an_artifact_nobody_asked_for(harness: AttackHarness, downloading: Release) -> None:
    """The attacker's own file, published on its own artifact topic: no download wants it."""
    evil = payload("evil model", 64)
    sha = sha256_hex(evil)
    assert_attack_refused(harness, lambda h: h.deliver(chunk_topic(sha, 0), evil),
                          f"ignored chunk 0 of {sha}: no download of it is under way")


def test_chunk_while_idle(harness: AttackHarness) -> None:
    first = install_first(harness)
    assert_attack_refused(harness, lambda h: h.deliver(chunk_topic(first.model_sha, 0), reverse(first.model[:64])),
                          f"ignored chunk 0 of {first.model_sha}: no download of it is under way")


# -- a stray publisher cannot abort a download that makes progress ------------------------------------


def test_corrupt_copy_racing_every_genuine_chunk(harness: AttackHarness, downloading: Release) -> None:
    """Anyone who can publish on the chunk topic could abort any rollout with one bad chunk: no more. Each
    genuine chunk that follows a corrupt copy is stored (all but the last, held back here)."""
    release = downloading

    def race(h: AttackHarness) -> None:
        for sha, ranges in list(h.reporter.unanswered):
            for start, end in ranges:
                for index in range(start, end):
                    good = chunk_of(h.blobs[sha], index)
                    h.updater.on_chunk(sha, index, reverse(good))  # the attacker's copy arrives first
                    if (sha, index) != (release.model_sha, MODEL_CHUNKS - 1):
                        h.updater.on_chunk(sha, index, good)
        h.reporter.unanswered.clear()
        h.mono.advance(CORRUPT_RETRY_S)
        h.updater.tick()  # asks again soon, for the one chunk still missing
        assert h.updater.state is State.DOWNLOADING
        assert h.reporter.wants[-1] == (release.model_sha, [(MODEL_CHUNKS - 1, MODEL_CHUNKS)])

    assert_attack_refused(harness, race, "dropped a copy of model.tflite chunk 4 that does not match its signed "
                          "sha256: asking again")


def test_corrupt_copies_to_abort_a_download(harness: AttackHarness) -> None:
    release = harness.release(version=1)
    harness.updater.offer(release.desired)
    harness.reporter.unanswered.clear()

    def one_good_and_one_bad_per_round(h: AttackHarness) -> None:
        model, last = release.model, MODEL_CHUNKS - 1
        for index in range(MODEL_CHUNKS):  # a corrupt copy of the last chunk in every round
            h.updater.on_chunk(release.model_sha, last, reverse(chunk_of(model, last)))
            h.updater.on_chunk(release.model_sha, index, chunk_of(model, index))
            h.mono.advance(CORRUPT_RETRY_S)
            h.updater.tick()  # a new round: asks again for what is missing, soon, because of the corrupt copy
        assert h.updater.state is State.DOWNLOADING
        assert h.reporter.wants[-1] == (release.eval_sha, [(0, 3)])  # the model is whole; the eval file is next

    assert_attack_refused(harness, one_good_and_one_bad_per_round,
                          "dropped a copy of model.tflite chunk 4 that does not match its signed sha256: asking again")


def test_corrupt_copies_while_the_server_is_away(harness: AttackHarness, downloading: Release) -> None:
    """A restarting server answers nothing for a few seconds; a stray publisher's copies alone do not
    end the download before the server is back."""
    release = downloading
    harness.reporter.unanswered.clear()

    def stray(h: AttackHarness) -> None:
        for _ in range(10):  # 10 s: every round brings only the stray copy
            h.updater.on_chunk(release.model_sha, 0, reverse(chunk_of(release.model, 0)))
            h.mono.advance(CORRUPT_RETRY_S)
            h.updater.tick()
        assert h.updater.state is State.DOWNLOADING
        h.reporter.unanswered.clear()
        h.updater.request_missing()  # the server is back: the agent still asks for the whole of both files
        assert sorted(h.reporter.unanswered) == sorted([(release.model_sha, [(0, MODEL_CHUNKS)]),
                                                        (release.eval_sha, [(0, 3)])])

    assert_attack_refused(harness, stray, "dropped a copy of model.tflite chunk 0 that does not match its signed "
                          "sha256: asking again")
