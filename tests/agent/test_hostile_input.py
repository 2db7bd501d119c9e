"""Hostile input that used to change signed work, one test per attack (python-tuf's habit).

Each test asserts the exact error and that the agent's trusted state and
active slot are byte-identical afterwards (or, where the attack is meant to
fail silently, that the genuine update still lands).

- a signed document with a duplicate key (issue 6.5);
- a forged desired state while a verified one waits its turn, and a replayed
  old genuine one (6.3);
- a release for another profile (6.6; also a row of the attack table in
  ``test_updater_scenarios.py``);
- corrupt chunk copies on the chunk topic (6.7).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.download import CORRUPT_RETRY_S
from agent.record import TrustedState
from agent.service import AgentService
from agent.states import State
from agent.updater import Updater
from shared.canonical import canonical_json
from shared.codec import encode
from shared.messages import UpdateState
from shared.mqtt import Inbound
from shared.topics import TopicKind, chunk_topic, device_topic
from tests.agent.fakes import HAPPY, Harness, ScriptedTrial, assert_idle, install_first
from tests.agent.material import (
    DEVICE,
    NOW,
    REQUEST_INTERVAL,
    Keys,
    Release,
    chunk_of,
    make_config,
    make_release,
    trusted_bytes,
)

# -- through the service: what arrives on the wire -----------------------------------------------


@pytest.fixture
def service(tmp_path: Path, keys: Keys) -> Iterator[AgentService]:
    config = make_config(tmp_path / "agent", keys, broker_url="mqtt://127.0.0.1:9")  # nobody listens
    svc = AgentService(
        config, updater_factory=lambda cfg, reporter: Updater(cfg, reporter, start_trial=ScriptedTrial(),
                                                              clock=lambda: NOW)
    )
    yield svc
    svc.link.stop()


def deliver(service: AgentService, release: Release) -> None:
    """The desired state and every chunk of both files, as the broker would hand them over."""
    service.handle(Inbound(device_topic(TopicKind.DESIRED, DEVICE), canonical_json(encode(release.desired)), True))
    for sha, blob in release.blobs().items():
        for index in range(-(-len(blob) // 64)):
            service.handle(Inbound(chunk_topic(sha, index), chunk_of(blob, index), False))


def trusted_and_active(data_dir: Path) -> dict[str, bytes]:
    return {name: (data_dir / name).read_bytes() for name in ("trusted.json", "active.json")} | {
        str(p.relative_to(data_dir)): p.read_bytes() for p in sorted((data_dir / "slots").rglob("*")) if p.is_file()
    }


def test_a_signed_document_with_a_duplicate_key_is_refused(
    service: AgentService, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Read last-wins, {"model": "evil", ..., "model": "kws"} verifies as the genuine manifest, while a
    first-wins reader sees "evil": no two parsers may see two documents behind one signature."""
    deliver(service, make_release(keys, version=1))
    assert service.updater.slots.active_deployment() == "dep-1"
    data_dir = service.config.data_dir
    before = trusted_and_active(data_dir)

    genuine = canonical_json(encode(make_release(keys, version=2).desired)).decode()
    assert genuine.count('"model":"kws"') == 1
    doubled = genuine.replace('"model":"kws"', '"model":"evil","model":"kws"')
    assert json.loads(doubled) == json.loads(genuine)  # what a last-wins reader sees: the signed document
    caplog.set_level(logging.WARNING, logger="agent.service")

    service.handle(Inbound(device_topic(TopicKind.DESIRED, DEVICE), doubled.encode(), True))

    (warning,) = [r.getMessage() for r in caplog.records if r.name == "agent.service"]
    assert warning == (
        f"dropped a malformed message on {device_topic(TopicKind.DESIRED, DEVICE)}: "
        "payload is not JSON: duplicate key 'model'"
    )
    assert service.updater.state is State.IDLE
    assert trusted_and_active(data_dir) == before


# -- through the updater -----------------------------------------------------------------------


def test_a_forged_desired_state_does_not_evict_a_verified_one_waiting_its_turn(harness: Harness) -> None:
    h = harness
    first, second = h.release(version=1), h.release(version=2)
    forged = h.release(version=3, director_key=h.keys.attacker)
    h.trial.hold = True  # the first install sits in its trial
    h.install(first)
    assert h.updater.state is State.TRIAL
    h.updater.offer(second.desired)
    assert h.updater.pending == second.desired

    h.updater.offer(forged.desired)

    assert h.updater.pending == second.desired
    assert h.reporter.rejections == [("dep-3", "rejected: no valid signature by a pinned director key")]
    h.trial.hold = False
    h.updater.tick()
    h.pump()
    assert h.reporter.states(first.deployment_id) == HAPPY
    assert h.reporter.states(second.deployment_id) == HAPPY
    assert h.reporter.states(forged.deployment_id) == []  # never reported on as a deployment
    assert h.active_model_bytes() == second.model


def test_replaying_an_old_genuine_desired_state_is_a_rejection_not_a_failure(harness: Harness) -> None:
    h = harness
    old = install_first(h)
    current = h.release(version=2)
    h.install(current)
    h.reporter.clear()
    before = h.snapshot("trusted.json", "active.json", "slots", "update-record.json")

    h.updater.offer(old.desired)  # genuinely signed, long superseded
    h.updater.offer(current.desired)  # the retained copy of what runs today: nothing to say

    assert h.reporter.events == []
    assert h.reporter.rejections == [(old.deployment_id, "rejected: release counter 1 is lower than the trusted 2")]
    assert h.snapshot("trusted.json", "active.json", "slots", "update-record.json") == before
    assert_idle(h)


def test_a_rejected_message_is_reported_once_however_often_it_comes(harness: Harness) -> None:
    h = harness
    forged = h.release(version=1, release_key=h.keys.attacker)
    for _ in range(3):  # a retained message comes again with every reconnect
        h.updater.offer(forged.desired)
    assert len(h.reporter.rejections) == 1


# -- chunks that do not match their signed digest ------------------------------------------------


def reverse(data: bytes) -> bytes:
    return data[::-1]


def test_a_corrupt_copy_ahead_of_the_genuine_chunk_is_dropped_and_the_install_goes_on(harness: Harness) -> None:
    """Anyone who can publish on the chunk topic could abort any rollout with one bad chunk: no more."""
    h = harness
    first = install_first(h)
    release = h.release(version=2)
    h.updater.offer(release.desired)
    for sha, ranges in list(h.reporter.unanswered):
        for start, end in ranges:
            for index in range(start, end):
                good = chunk_of(h.blobs[sha], index)
                h.updater.on_chunk(sha, index, reverse(good))  # the attacker's copy arrives first
                h.updater.on_chunk(sha, index, good)
    h.reporter.unanswered.clear()

    assert h.reporter.states() == HAPPY
    assert h.active_model_bytes() == release.model
    assert h.slot_file("a").read_bytes() == first.model
    assert h.trusted_path.read_bytes() == trusted_bytes(TrustedState(2, 2, release.deployment_id))


def test_corrupt_copies_cannot_abort_a_download_that_makes_progress(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    h.reporter.unanswered.clear()
    model, count = release.model, 5
    for index in range(count):  # one good chunk per request round, and a corrupt copy of the last one every round
        h.updater.on_chunk(release.model_sha, count - 1, reverse(chunk_of(model, count - 1)))
        h.updater.on_chunk(release.model_sha, index, chunk_of(model, index))
        h.mono.advance(CORRUPT_RETRY_S)
        h.updater.tick()  # a new round: asks again for what is missing, soon, because of the corrupt copy
    assert h.updater.state is State.DOWNLOADING
    assert h.reporter.wants[-1] == (release.eval_sha, [(0, 3)])  # the model is whole; the eval file is next
    h.pump()
    assert h.reporter.states() == HAPPY


def test_a_download_fails_only_when_nothing_but_corrupt_copies_came_for_a_while(harness: Harness) -> None:
    """Three request rounds in a row with corrupt copies and nothing good, over three request intervals
    (15 s here) without a good chunk: the server's own copy is bad."""
    h = harness
    before = install_first(h)
    release = h.release(version=2)
    h.updater.offer(release.desired)
    # The first round brings every other chunk: progress, so its corrupt copy does not count.
    h.pump(tamper=lambda sha, index, data: reverse(data) if sha == release.model_sha and index == 4 else data)
    started = h.mono.now
    rounds = 0
    while True:
        h.mono.advance(CORRUPT_RETRY_S)
        h.updater.tick()
        if h.updater.state is not State.DOWNLOADING:
            break
        rounds += 1
        assert list(h.reporter.unanswered) == [(release.model_sha, [(4, 5)])]  # that chunk again, and only it
        h.pump(tamper=lambda sha, index, data: reverse(data))
    assert h.mono.now - started == pytest.approx(3 * REQUEST_INTERVAL)
    assert h.reporter.final() == (
        release.deployment_id, UpdateState.FAILED,
        (f"model.tflite chunk 4 came only in copies that do not match its signed sha256: {rounds} requests "
         "in a row over 15 s"),
    )
    assert h.active_model_bytes() == before.model
    assert h.trusted_path.read_bytes() == trusted_bytes(TrustedState(2, 2, release.deployment_id))


def test_corrupt_copies_while_the_server_is_away_do_not_fail_a_download_that_resumes(harness: Harness) -> None:
    """A restarting server answers nothing for a few seconds; a stray publisher's copies alone do not
    end the download before the server is back."""
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    h.reporter.unanswered.clear()
    for _ in range(10):  # 10 s: every round brings only the stray copy
        h.updater.on_chunk(release.model_sha, 0, reverse(chunk_of(release.model, 0)))
        h.mono.advance(CORRUPT_RETRY_S)
        h.updater.tick()
    assert h.updater.state is State.DOWNLOADING
    h.reporter.unanswered.clear()
    h.updater.request_missing()  # the server is back
    h.pump()
    assert h.reporter.states() == HAPPY
