"""A table of update scenarios driving ``agent.updater.Updater`` with injected failures.

Mender's daemon state tests are the model: each row names an injected
problem, and the test asserts the reported event sequence, the final reason,
which model is active and which files moved. Crashes, full disks and stalls
live in ``test_updater_recovery.py``; attacks in ``tests/attacks/``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.download import WANT_WINDOW_CHUNKS
from agent.record import TrustedState, UpdateRecord
from agent.states import State
from shared.errors import StorageError
from shared.messages import BenchmarkResult, Gates, PreviousModel, UpdateState
from shared.signing import public_key_text
from shared.trial import TrialResult
from tests.agent.fakes import (
    HAPPY,
    OK_RESULT,
    UNTIL_TRIAL,
    Harness,
    assert_idle,
    enospc_when,
    install_first,
    settle_corrupt_download,
)
from tests.agent.material import (
    BENCHMARK,
    GATES,
    REQUEST_INTERVAL,
    chunk_of,
    make_config,
    payload,
    trusted_bytes,
)

# -- the scenario table ------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    events: list[str]  # reported states for the new deployment, in order
    reason: tuple[str, ...] = ()  # substrings of the final event's reason ("" reason if empty)
    trial: TrialResult = OK_RESULT
    tamper: bool = False
    disk_full: str | None = None  # "stage" or "commit"
    reason_prefix: str = ""
    telemetry: int = 1
    gates: Gates = GATES
    exact_reason: str | None = None  # the whole final reason, when a row pins it

    @property
    def commits(self) -> bool:
        return self.events[-1] == "committed"


SLOW = dataclasses.replace(BENCHMARK, p95_ms=42.5, p99_ms=50.0, max_ms=60.0)
FAST = dataclasses.replace(BENCHMARK, p50_ms=0.5, p95_ms=1.0)  # what the replaced model measures in these rows
COMPARED = Gates(min_accuracy=0.8, max_p95_ms=10.0, max_regression=0.01, max_latency_ratio=1.5)


def with_previous(accuracy: float, benchmark: BenchmarkResult = BENCHMARK, previous_accuracy: float = 0.95,
                  previous: BenchmarkResult | None = FAST, previous_error: str = "") -> TrialResult:
    return TrialResult(ok=True, benchmark=benchmark, accuracy=accuracy, samples=120, previous_benchmark=previous,
                       previous_accuracy=None if previous is None else previous_accuracy,
                       previous_error=previous_error)


SCENARIOS = [
    Scenario("happy path", HAPPY),
    Scenario(
        "accuracy below the gate",
        UNTIL_TRIAL + ["rolled_back"],
        reason=("accuracy", "0.5000", "0.8000"),
        trial=TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.5, samples=120),
    ),
    Scenario(
        "p95 above the gate",
        UNTIL_TRIAL + ["rolled_back"],
        reason=("p95", "42.500", "10.000"),
        trial=TrialResult(ok=True, benchmark=SLOW, accuracy=0.95, samples=120),
    ),
    Scenario(
        "both gates fail",
        UNTIL_TRIAL + ["rolled_back"],
        reason=("accuracy", "p95"),
        trial=TrialResult(ok=True, benchmark=SLOW, accuracy=0.1, samples=120),
    ),
    Scenario(
        "within the budgets against the replaced model",
        HAPPY,
        gates=COMPARED,
        trial=with_previous(0.94, dataclasses.replace(BENCHMARK, p95_ms=1.5)),  # 0.01 and 1.5x: at both limits
    ),
    Scenario(
        "accuracy regressed against the replaced model",
        UNTIL_TRIAL + ["rolled_back"],
        gates=COMPARED,
        trial=with_previous(0.93, dataclasses.replace(BENCHMARK, p95_ms=1.2), previous_accuracy=0.95),
        exact_reason="accuracy 0.9300 is 0.0200 below the replaced model's 0.9500 (max regression 0.0100)",
    ),
    Scenario(
        "slower than the replaced model",
        UNTIL_TRIAL + ["rolled_back"],
        gates=COMPARED,
        trial=with_previous(0.95),
        exact_reason="p95 latency 1.600 ms is 1.60x the replaced model's 1.000 ms (max 1.50x)",
    ),
    Scenario(
        "every check fails, each named with its numbers",
        UNTIL_TRIAL + ["rolled_back"],
        gates=COMPARED,
        trial=with_previous(0.5, SLOW, previous_accuracy=0.9),
        exact_reason="accuracy 0.5000 below the gate 0.8000; "
        "accuracy 0.5000 is 0.4000 below the replaced model's 0.9000 (max regression 0.0100); "
        "p95 latency 42.500 ms above the gate 10.000 ms; "
        "p95 latency 42.500 ms is 42.50x the replaced model's 1.000 ms (max 1.50x)",
    ),
    Scenario(
        "the replaced model could not run on this eval set: no comparison",
        HAPPY,
        gates=Gates(min_accuracy=0.8, max_regression=0.0, max_latency_ratio=1.0),
        trial=with_previous(0.85, SLOW, previous=None, previous_error="benchmark failed: cannot reshape"),
    ),
    Scenario(
        "model does not load",
        UNTIL_TRIAL + ["rolled_back"],
        reason=("Didn't find op for builtin opcode",),
        reason_prefix="load_error: ",
        trial=TrialResult(ok=False, error="Didn't find op for builtin opcode 'FULLY_CONNECTED'", load_error=True),
        telemetry=0,
    ),
    Scenario(
        "trial process died",
        UNTIL_TRIAL + ["rolled_back"],
        reason=("exit code -9",),
        reason_prefix="trial failed: ",
        trial=TrialResult(ok=False, error="trial process died with exit code -9: "),
        telemetry=0,
    ),
    Scenario(
        "ok without numbers counts as a failed trial",
        UNTIL_TRIAL + ["rolled_back"],
        reason_prefix="trial failed: ",
        trial=TrialResult(ok=True, benchmark=None, accuracy=None),
        telemetry=0,
    ),
    Scenario(
        "a chunk corrupt in every copy",
        ["downloading", "failed"],
        reason=("model.tflite chunk 2 came only in copies that do not match its signed sha256: ", " over 15 s"),
        tamper=True,
        telemetry=0,
    ),
    Scenario(
        "disk full while staging",
        ["downloading", "verifying", "staged", "failed"],
        reason=("disk full", "slot b"),
        disk_full="stage",
        telemetry=0,
    ),
    Scenario(
        "disk full while committing",
        UNTIL_TRIAL + ["rolled_back"],
        reason=("disk full", "active.json"),
        disk_full="commit",
    ),
]


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
def test_update_scenario(sc: Scenario, harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    first = install_first(h)
    second = h.release(version=2, gates=sc.gates)
    before_active = h.snapshot("slots/a", "active.json")

    h.trial.result = sc.trial
    seen_during_trial: dict[str, bytes] = {}
    h.trial.during = lambda request: seen_during_trial.update(h.snapshot("slots/a", "active.json"))
    refused: list[Path] = []
    if sc.disk_full == "stage":
        refused = enospc_when(lambda p: (h.data_dir / "slots") in p.parents, monkeypatch)
    elif sc.disk_full == "commit":
        refused = enospc_when(lambda p: p == h.active_pointer, monkeypatch)

    def tamper(sha: str, index: int, data: bytes) -> bytes:
        return data[::-1] if sha == second.model_sha and index == 2 else data

    h.updater.offer(second.desired)
    h.pump(tamper=tamper if sc.tamper else None)
    if sc.tamper:  # the bad copy is dropped and asked for again, until the rounds run out
        settle_corrupt_download(h, tamper)

    # The reported lifecycle, and nothing about other deployments.
    assert h.reporter.states() == sc.events
    assert {d for d, _, _ in h.reporter.events} == {second.deployment_id}
    _, final, reason = h.reporter.final()
    assert final is UpdateState(sc.events[-1])
    for part in sc.reason:
        assert part in reason
    assert reason.startswith(sc.reason_prefix)
    if sc.exact_reason is not None:
        assert reason == sc.exact_reason
        assert h.updater.record.reason == sc.exact_reason  # stored as reported
    elif not sc.reason and not sc.reason_prefix:
        assert reason == ""
    assert all(r == "" for _, s, r in h.reporter.events if not s.is_final)  # in-flight events carry no reason
    assert len(h.reporter.telemetry_calls) == sc.telemetry
    if sc.telemetry:
        deployment, _, accuracy, _, previous = h.reporter.telemetry_calls[0]
        assert (deployment, accuracy) == (second.deployment_id, sc.trial.accuracy)
        if sc.trial.previous_benchmark is None:
            assert previous is None
        else:  # the replaced model's numbers from this trial, named by the active slot's manifest
            assert previous == PreviousModel(
                model="kws", version=1, sha256=first.model_sha, accuracy=sc.trial.previous_accuracy,
                p50_ms=sc.trial.previous_benchmark.p50_ms, p95_ms=sc.trial.previous_benchmark.p95_ms,
            )
    if "trial" in sc.events:  # the trial measured the committed model too
        assert h.trial.requests[-1].previous_model_path == str(h.slot_file("a"))
    if sc.disk_full:
        assert refused, "the injected disk-full never triggered"

    # Where the agent ended up.
    assert_idle(h)
    assert h.reporter.watching == set()
    assert not (h.data_dir / "downloads").exists()
    # Trust advances when the metadata verified, whatever happens to the bytes afterwards.
    assert h.trusted_path.read_bytes() == trusted_bytes(TrustedState(2, 2, second.deployment_id))
    if "trial" in sc.events:
        # The previous slot was never touched while the new model was on trial.
        assert seen_during_trial == before_active
    if sc.commits:
        assert h.updater.slots.active_slot() == "b"
        assert h.active_model_bytes() == second.model
        assert h.updater.slots.active_deployment() == second.deployment_id
        assert h.slot_file("a").read_bytes() == first.model  # the previous model stays as the fallback
    else:
        assert h.snapshot("slots/a", "active.json") == before_active
        assert h.updater.slots.active_slot() == "a"
        assert h.active_model_bytes() == first.model
        assert not h.slot_file("b").exists()  # a rolled-back or failed stage leaves no half slot


def test_a_large_file_is_asked_for_and_listened_to_one_window_of_missing_chunks_at_a_time(harness: Harness) -> None:
    """The agent listens only for chunks it still misses: one topic each, dropped as each one arrives (a copy
    another device asked for no longer reaches it), and the next window is asked for as soon as one is in."""
    h = harness
    count = 2 * WANT_WINDOW_CHUNKS + 10
    release = h.release(version=1, model=payload("large-model", count * 64))
    h.updater.offer(release.desired)
    model = release.model_sha
    assert (model, [(0, WANT_WINDOW_CHUNKS)]) in h.reporter.wants
    assert h.reporter.watch_log[-2:] == [(model, list(range(WANT_WINDOW_CHUNKS))), (release.eval_sha, [0, 1, 2])]

    h.reporter.unanswered.remove((model, [(0, WANT_WINDOW_CHUNKS)]))  # answered chunk by chunk below
    h.updater.on_chunk(model, 5, chunk_of(release.model, 5))
    assert h.reporter.watch_log[-1] == (model, [i for i in range(WANT_WINDOW_CHUNKS) if i != 5])
    for index in range(WANT_WINDOW_CHUNKS - 1):
        if index != 5:
            h.updater.on_chunk(model, index, chunk_of(release.model, index))
    assert [sha for sha, _ in h.reporter.unanswered] == [release.eval_sha]  # a chunk is still out: no new ask
    h.updater.on_chunk(model, WANT_WINDOW_CHUNKS - 1, chunk_of(release.model, WANT_WINDOW_CHUNKS - 1))
    second = list(range(WANT_WINDOW_CHUNKS, 2 * WANT_WINDOW_CHUNKS))
    assert h.reporter.watch_log[-1] == (model, second)
    assert h.reporter.unanswered[-1] == (model, [(WANT_WINDOW_CHUNKS, 2 * WANT_WINDOW_CHUNKS)])

    h.pump()
    assert h.reporter.wants[-1] == (model, [(2 * WANT_WINDOW_CHUNKS, count)])
    assert h.reporter.watching == set()
    assert h.reporter.states() == HAPPY
    assert h.slot_file("a").read_bytes() == release.model


def test_a_resumed_download_asks_and_listens_only_for_the_chunks_the_disk_lacks(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    h.reporter.unanswered.clear()
    for index in (0, 2, 3):
        h.updater.on_chunk(release.model_sha, index, chunk_of(release.model, index))
    h.reporter.clear()
    h.restart().resume()
    assert (release.model_sha, [(1, 2), (4, 5)]) in h.reporter.wants
    assert (release.model_sha, [1, 4]) in h.reporter.watch_log


# -- happy path in detail ----------------------------------------------------------------


def test_first_install_from_nothing(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)

    # Accepting asks for every chunk of both files and watches both chunk topics.
    assert sorted(h.reporter.wants) == sorted([(release.model_sha, [(0, 5)]), (release.eval_sha, [(0, 3)])])
    assert h.reporter.watching == {release.model_sha, release.eval_sha}
    assert h.updater.state is State.DOWNLOADING
    assert h.reporter.states() == ["downloading"]

    h.pump()

    assert h.reporter.events == [(release.deployment_id, UpdateState(s), "") for s in HAPPY]
    assert len(h.reporter.telemetry_calls) == 1
    deployment, benchmark, accuracy, samples, previous = h.reporter.telemetry_calls[0]
    assert (deployment, benchmark, accuracy, samples) == (release.deployment_id, BENCHMARK, 0.95, 120)
    assert previous is None  # nothing installed before: nothing to compare with
    assert_idle(h)
    assert h.updater.slots.active_slot() == "a"
    assert h.slot_file("a").read_bytes() == release.model
    assert h.slot_file("a", "eval.npz").read_bytes() == release.eval
    assert h.updater.slots.active_manifest() == release.manifest
    assert h.updater.active_summary() == (release.manifest, release.deployment_id)
    assert h.reporter.watching == set()
    # The trial ran on the staged files, with the configured benchmark settings.
    (request,) = h.trial.requests
    assert Path(request.model_path) == h.slot_file("a")
    assert Path(request.eval_path) == h.slot_file("a", "eval.npz")
    # [runtime] threads = 0 and a manifest that names none: one thread.
    assert (request.min_runs, request.threads) == (h.config.benchmark.min_runs, 1)
    assert request.previous_model_path is None


def test_second_install_uses_the_other_slot_and_leaves_the_first_alone_until_commit(harness: Harness) -> None:
    h = harness
    first = install_first(h)
    second = h.release(version=2)
    slot_a = h.snapshot("slots/a")
    during: dict[str, Any] = {}

    def look(request: Any) -> None:
        during["slot_a"] = h.snapshot("slots/a")
        during["active"] = h.updater.slots.active_slot()
        during["model_path"] = Path(request.model_path)

    h.trial.during = look
    h.install(second)

    assert h.reporter.states() == HAPPY
    assert during == {"slot_a": slot_a, "active": "a", "model_path": h.slot_file("b")}
    assert h.updater.slots.active_slot() == "b"
    assert h.active_model_bytes() == second.model
    assert h.snapshot("slots/a") == slot_a
    assert h.slot_file("a").read_bytes() == first.model

    # A third version goes back to slot a, never touching the now-active b.
    h.reporter.clear()
    slot_b = h.snapshot("slots/b")
    third = h.release(version=3)
    h.trial.during = lambda request: during.update(slot_b_during=h.snapshot("slots/b"))
    h.install(third)
    assert during["slot_b_during"] == slot_b
    assert h.updater.slots.active_slot() == "a"
    assert h.active_model_bytes() == third.model


def test_a_file_already_held_in_a_slot_is_copied_not_downloaded(harness: Harness) -> None:
    h = harness
    first = install_first(h)
    second = h.release(version=2, eval_bytes=first.eval)  # same eval set, new model
    h.install(second)

    assert {sha for sha, _ in h.reporter.wants} == {second.model_sha}
    assert h.reporter.states() == HAPPY
    assert h.slot_file("b", "eval.npz").read_bytes() == first.eval
    assert h.slot_file("a", "eval.npz").read_bytes() == first.eval  # copied, not moved


def test_chunks_in_any_order_and_duplicates_are_fine(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    h.reporter.unanswered.clear()
    for sha, blob, count in ((release.eval_sha, release.eval, 3), (release.model_sha, release.model, 5)):
        for index in reversed(range(count)):
            data = blob[index * 64 : (index + 1) * 64]
            h.updater.on_chunk(sha, index, data)
            h.updater.on_chunk(sha, index, data)  # a QoS 1 duplicate
    h.updater.on_chunk(release.model_sha, 99, b"out of range")  # ignored
    assert h.reporter.states() == HAPPY


def test_chunks_for_an_unknown_file_or_while_idle_are_ignored(harness: Harness) -> None:
    h = harness
    h.updater.on_chunk("ab" * 32, 0, b"stray")
    assert h.reporter.events == []
    assert not h.data_dir.exists() or h.snapshot() == {}


# -- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["release", "director"])
def test_no_pinned_key_refuses_everything(role: str, harness: Harness) -> None:
    h = harness
    empty: dict[str, tuple[str, ...]] = {f"{role}_keys": ()}
    h.config = make_config(h.data_dir, h.keys, **empty)  # type: ignore[arg-type]
    h.restart()
    release = h.release(version=1)
    h.updater.offer(release.desired)

    assert h.reporter.events == []
    ((claimed, reason),) = h.reporter.rejections
    assert claimed == release.deployment_id
    assert f"no {role} key is pinned" in reason
    assert h.updater.state is State.IDLE
    assert h.snapshot() == {}


def test_a_rotated_key_is_accepted_when_pinned_alongside_the_old_one(harness: Harness) -> None:
    h = harness
    old = h.keys.release

    h.config = make_config(
        h.data_dir,
        h.keys,
        release_keys=(public_key_text(old.public_key()), public_key_text(h.keys.attacker.public_key())),
    )
    h.restart()
    release = h.release(version=1, release_key=h.keys.attacker)  # "attacker" is the new release key here
    h.install(release)
    assert h.reporter.states() == HAPPY


# -- the retained desired state comes again -------------------------------------------------


def test_the_same_desired_state_twice_installs_once(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    h.updater.offer(release.desired)  # retained copy again, while downloading: not a pending update
    assert h.updater.pending is None
    h.pump()
    assert h.reporter.states() == HAPPY
    events, trials, record = list(h.reporter.events), len(h.trial.requests), h.snapshot()

    h.updater.offer(release.desired)  # after the install: already handled
    h.restart().resume()  # ... also after a restart
    h.updater.offer(release.desired)

    assert h.reporter.events == events
    assert len(h.trial.requests) == trials
    assert h.snapshot() == record
    assert_idle(h)


def test_the_same_failed_desired_state_is_not_retried(harness: Harness) -> None:
    h = harness
    install_first(h)
    second = h.release(version=2)
    h.trial.result = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.1, samples=10)
    h.install(second)
    assert h.reporter.final()[1] is UpdateState.ROLLED_BACK
    h.reporter.clear()
    h.updater.offer(second.desired)
    assert h.reporter.events == []
    assert h.updater.state is State.IDLE


# -- a newer directive before the trial: the current install is cancelled ----------------------


def refuse_once(h: Harness, monkeypatch: pytest.MonkeyPatch, when: Callable[[UpdateRecord], bool]) -> None:
    """The disk refuses the first save of a record matching ``when``: the step stops where it was."""
    real_save = h.updater.records.save_record
    refused: list[UpdateRecord] = []

    def save_record(record: UpdateRecord) -> None:
        if not refused and when(record):
            refused.append(record)
            raise StorageError("disk full while writing update-record.json")
        real_save(record)

    monkeypatch.setattr(h.updater.records, "save_record", save_record)


def stop_in(where: str, h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bring the deployment on offer to rest in ``where``: mid-download, or a verifying or staging step
    that a full disk interrupted (the service loop logs the error; the next message or tick goes on)."""
    if where == "downloading":
        assert h.pump(max_chunks=3) == 3
        return
    if where == "verifying":
        refuse_once(h, monkeypatch, lambda r: r.current is State.STAGED)
    else:  # staged: the files are in the slot, the record naming the slot is refused
        refuse_once(h, monkeypatch, lambda r: r.current is State.STAGED and r.slot is not None)
    with pytest.raises(StorageError):
        h.pump()
    monkeypatch.undo()


@pytest.mark.parametrize(
    ("where", "reported"),
    [
        ("downloading", ["downloading"]),
        ("verifying", ["downloading", "verifying"]),
        ("staged", ["downloading", "verifying", "staged"]),
    ],
)
def test_a_newer_directive_cancels_an_install_before_its_trial(
    where: str, reported: list[str], harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator aborts or rolls back a rollout: the server sends a newer directive. A device that has
    not started the trial of the aborted version must never go on to install it."""
    h = harness
    first = install_first(h)
    aborted, newer = h.release(version=2), h.release(version=3)
    before_active = h.snapshot("slots/a", "active.json")
    trials = len(h.trial.requests)
    h.updater.offer(aborted.desired)
    stop_in(where, h, monkeypatch)
    assert h.updater.state is State(where)

    h.updater.offer(newer.desired)

    # The aborted deployment ends FAILED, naming what superseded it; it never reached a trial.
    assert h.reporter.states(aborted.deployment_id) == [*reported, "failed"]
    assert h.reporter.final(aborted.deployment_id) == (aborted.deployment_id, UpdateState.FAILED,
                                                       f"superseded by deployment {newer.deployment_id}")
    assert len(h.trial.requests) == trials
    # Nothing of it is left: no download, no slot, no chunk subscription; the active model untouched.
    held = h.snapshot("downloads", "slots")
    assert not any(aborted.model_sha in name for name in held)
    assert aborted.model not in held.values() and aborted.eval not in held.values()
    assert not h.slot_file("b").exists()
    assert h.snapshot("slots/a", "active.json") == before_active
    assert h.reporter.watching == {newer.model_sha, newer.eval_sha}
    # The newer one is accepted at once and installs.
    assert h.updater.pending is None
    assert h.updater.state is State.DOWNLOADING and h.updater.record.deployment_id == newer.deployment_id
    assert h.reporter.states(newer.deployment_id) == ["downloading"]
    assert h.trusted_path.read_bytes() == trusted_bytes(TrustedState(3, 3, newer.deployment_id))
    h.pump()
    assert h.reporter.states(newer.deployment_id) == HAPPY
    assert h.active_model_bytes() == newer.model
    assert h.slot_file("a").read_bytes() == first.model  # the fallback stays
    assert_idle(h)


def test_a_cancel_the_disk_interrupts_is_retried_and_the_aborted_version_never_installs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    first = install_first(h)
    aborted, newer = h.release(version=2), h.release(version=3)
    h.updater.offer(aborted.desired)
    h.pump(max_chunks=3)
    refuse_once(h, monkeypatch, lambda r: r.current is State.DOWNLOADING and r.reason.startswith("superseded"))

    with pytest.raises(StorageError):
        h.updater.offer(newer.desired)
    assert h.updater.state is State.DOWNLOADING and h.updater.pending == newer.desired

    # The rest of the aborted download arrives meanwhile: it must not go on to verify, stage or trial.
    h.pump()
    assert h.reporter.states(aborted.deployment_id) == ["downloading", "failed"]
    assert h.reporter.final(aborted.deployment_id)[2] == f"superseded by deployment {newer.deployment_id}"
    assert h.updater.record.deployment_id == newer.deployment_id
    h.pump()
    assert h.reporter.states(newer.deployment_id) == HAPPY
    assert h.active_model_bytes() == newer.model
    assert h.slot_file("a").read_bytes() == first.model


def test_a_cancel_the_disk_interrupts_is_retried_by_tick(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    install_first(h)
    aborted, newer = h.release(version=2), h.release(version=3)
    h.updater.offer(aborted.desired)
    refuse_once(h, monkeypatch, lambda r: r.reason.startswith("superseded"))
    with pytest.raises(StorageError):
        h.updater.offer(newer.desired)
    h.reporter.unanswered.clear()  # no chunk arrives: only the loop's tick can move it on

    h.updater.tick()

    assert h.reporter.final(aborted.deployment_id)[1] is UpdateState.FAILED
    assert h.updater.record.deployment_id == newer.deployment_id and h.updater.state is State.DOWNLOADING


def test_the_first_install_is_cancelled_too(harness: Harness) -> None:
    h = harness
    aborted, newer = h.release(version=1), h.release(version=2)
    h.updater.offer(aborted.desired)
    h.updater.offer(newer.desired)
    assert h.reporter.states(aborted.deployment_id) == ["downloading", "failed"]
    h.pump()
    assert h.reporter.states(newer.deployment_id) == HAPPY
    assert h.updater.slots.active_slot() == "a" and h.active_model_bytes() == newer.model


# -- a newer directive during the trial waits its turn ----------------------------------------------


def test_a_directive_during_the_trial_is_kept_pending_and_accepted_after(harness: Harness) -> None:
    h = harness
    install_first(h)
    second, third = h.release(version=2), h.release(version=3)
    h.trial.hold = True
    h.install(second)
    assert h.updater.state is State.TRIAL

    h.updater.offer(third.desired)

    assert h.updater.pending == third.desired
    assert h.reporter.states(third.deployment_id) == []  # nothing said about it yet
    assert h.updater.records.load_trusted().directive_seq == 2  # nor trusted yet
    assert h.reporter.states(second.deployment_id) == UNTIL_TRIAL  # the trial goes on
    h.trial.hold = False
    h.updater.tick()

    assert h.reporter.states(second.deployment_id) == HAPPY
    assert h.updater.pending is None
    assert h.updater.record.deployment_id == third.deployment_id
    assert h.reporter.states(third.deployment_id)[0] == "downloading"
    assert h.updater.records.load_trusted() == TrustedState(3, 3, third.deployment_id)


def test_a_newer_directive_during_the_trial_replaces_the_pending_one(harness: Harness) -> None:
    h = harness
    install_first(h)
    second, third, fourth = (h.release(version=v) for v in (2, 3, 4))
    h.trial.hold = True
    h.install(second)
    h.updater.offer(fourth.desired)
    h.updater.offer(third.desired)  # older than the pending one: it does not replace it
    assert h.updater.pending == fourth.desired
    assert h.updater.state is State.TRIAL


def test_a_pending_directive_is_installed_after_the_current_one(harness: Harness) -> None:
    h = harness
    install_first(h)
    second, third = h.release(version=2), h.release(version=3)
    h.trial.hold = True
    h.install(second)
    h.updater.offer(third.desired)
    h.trial.hold = False

    # Give it every chance: the periodic tick, as the service loop would.
    h.mono.advance(REQUEST_INTERVAL)
    h.updater.tick()
    h.pump()

    assert h.reporter.states(second.deployment_id) == HAPPY
    assert h.reporter.states(third.deployment_id) == HAPPY
    assert_idle(h)
    assert h.active_model_bytes() == third.model


def test_a_directive_that_fails_verification_while_busy_never_becomes_pending(harness: Harness) -> None:
    h = harness
    first = h.release(version=1)
    bad = h.release(version=2, device_id="pi-garage-02")
    h.updater.offer(first.desired)
    h.updater.offer(bad.desired)
    assert h.updater.pending is None  # refused at once, not kept for later
    ((claimed, reason),) = h.reporter.rejections
    assert claimed == bad.deployment_id and "directive is for device pi-garage-02" in reason
    h.pump()
    assert h.reporter.states(first.deployment_id) == HAPPY
    assert h.reporter.states(bad.deployment_id) == []  # no deployment event for what was never trusted
    assert_idle(h)
    assert h.active_model_bytes() == first.model


def test_the_profiles_thread_count_from_the_manifest_reaches_the_trial(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.config._usable_cpus", lambda: 4)  # a 4-core board, whatever runs the test
    h = harness
    h.install(h.release(version=1, threads=4))
    (request,) = h.trial.requests
    assert request.threads == 4


def test_runtime_threads_in_the_config_override_the_profiles(harness: Harness) -> None:
    from dataclasses import replace

    from agent.config import RuntimeSection

    h = harness
    h.config = replace(h.config, runtime=RuntimeSection(threads=2))
    h.updater = h.new_updater()
    h.install(h.release(version=1, threads=4))
    (request,) = h.trial.requests
    assert request.threads == 2


def test_the_download_logs_its_progress_at_each_quarter(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h = harness
    release = h.release(version=1, model=bytes(range(256)) * 4)  # 1 KiB: 16 chunks of 64 bytes
    with caplog.at_level(logging.INFO, logger="agent.updater"):
        h.install(release)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloading model.tflite")]
    assert lines[0] == "downloading model.tflite for deployment dep-1: 0.1/1.0 KiB (6%)"  # the first chunk
    assert [line.rsplit("(", 1)[1] for line in lines[1:]] == ["25%)", "50%)", "75%)", "100%)"]
