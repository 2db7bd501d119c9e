"""Recovery scenarios for ``agent.updater.Updater``: simulated crashes, full disks, stalled downloads.

A crash is an exception the updater does not catch (``Crash``) raised at a
chosen point; the test then builds a new Updater on the same data directory,
as a restarted agent would, and calls ``resume()``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

import shared.files
from agent.files import atomic_write_json, storage_error
from agent.states import State
from shared.errors import StorageError
from shared.messages import UpdateState
from tests.agent.fakes import HAPPY, Crash, Harness, assert_idle, enospc_when, install_first
from tests.agent.material import REQUEST_INTERVAL, STALL_TIMEOUT

# -- crashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("previous", [False, True], ids=["first-install", "with-previous"])
def test_crash_during_trial_rolls_back_on_restart(previous: bool, harness: Harness) -> None:
    h = harness
    first = install_first(h) if previous else None
    before_active = h.snapshot("slots/a", "active.json")
    release = h.release(version=2)

    def crash(request: Any) -> None:
        raise Crash("the model took the agent down")

    h.trial.during = crash
    h.updater.offer(release.desired)
    with pytest.raises(Crash):
        h.pump()
    assert h.updater.records.load_record().current is State.TRIAL  # saved before the trial started
    staged_slot = "b" if previous else "a"
    assert h.slot_file(staged_slot).read_bytes() == release.model

    h.trial.during = None
    h.reporter.clear()
    trials = len(h.trial.requests)
    h.restart().resume()

    assert h.reporter.events == [(release.deployment_id, UpdateState.ROLLED_BACK, "agent restarted during trial")]
    assert len(h.trial.requests) == trials  # the trial is not run again
    assert_idle(h)
    assert not h.slot_file(staged_slot).exists()
    if first is not None:
        assert h.snapshot("slots/a", "active.json") == before_active
        assert h.active_model_bytes() == first.model
    else:
        assert h.updater.slots.active_slot() is None


def test_record_set_to_trial_by_hand_rolls_back_on_resume(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same crash, built by hand: stop at STAGED, then write the record as the trial would have."""
    h = harness
    first = install_first(h)
    release = h.release(version=2)
    real_save = h.updater.records.save_record

    def save_record(record: Any) -> None:
        if record.current is State.TRIAL:
            raise Crash("stop at staged")
        real_save(record)

    monkeypatch.setattr(h.updater.records, "save_record", save_record)
    h.updater.offer(release.desired)
    with pytest.raises(Crash):
        h.pump()
    monkeypatch.undo()
    record = h.updater.records.load_record()
    assert (record.current, record.slot) == (State.STAGED, "b")
    h.updater.records.save_record(record.moved(State.TRIAL))

    h.reporter.clear()
    trials = len(h.trial.requests)
    h.restart().resume()
    assert h.reporter.events == [(release.deployment_id, UpdateState.ROLLED_BACK, "agent restarted during trial")]
    assert len(h.trial.requests) == trials
    assert_idle(h)
    assert h.active_model_bytes() == first.model
    assert not h.slot_file("b").exists()


def test_crash_while_downloading_resumes_with_only_the_missing_chunks(harness: Harness) -> None:
    h = harness
    install_first(h)
    release = h.release(version=2)
    h.updater.offer(release.desired)
    assert [sha for sha, _ in h.reporter.unanswered] == [release.model_sha, release.eval_sha]  # manifest order
    assert h.pump(max_chunks=3) == 3  # model chunks 0-2 arrive, then the power goes
    assert h.updater.records.load_record().current is State.DOWNLOADING

    h.reporter.clear()
    h.restart().resume()

    # Only what is missing is asked for, and nothing is reported twice.
    assert h.reporter.wants == [(release.model_sha, [(3, 5)]), (release.eval_sha, [(0, 3)])]
    assert h.reporter.watching == {release.model_sha, release.eval_sha}
    assert h.reporter.events == []

    h.pump()
    assert h.reporter.states() == ["verifying", "staged", "trial", "committed"]
    assert h.active_model_bytes() == release.model


def test_after_a_power_cut_only_chunks_that_hash_right_count_as_held(harness: Harness) -> None:
    """Chunks are written without an fsync each: the signed chunk digests are the progress record.
    A chunk the disk lost, or tore, after a power cut is asked for again; the rest is kept."""
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    assert h.pump(max_chunks=4) == 4  # model chunks 0-3 written
    part = h.data_dir / "downloads" / f"{release.model_sha}.part"
    with open(part, "r+b") as fh:  # chunk 1 half written, chunk 3 never reached the disk
        fh.seek(64 + 32)
        fh.write(b"\x00" * 32)
        fh.seek(3 * 64)
        fh.write(b"\x00" * 64)

    h.reporter.clear()
    h.restart().resume()

    assert h.reporter.wants == [(release.model_sha, [(1, 2), (3, 5)]), (release.eval_sha, [(0, 3)])]
    h.pump()
    assert h.reporter.states() == ["verifying", "staged", "trial", "committed"]
    assert h.active_model_bytes() == release.model


def test_a_download_costs_one_fsync_per_file(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    parts: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".part"):
            parts.append(Path(path).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    h.pump()  # 5 model chunks and 3 eval chunks
    assert sorted(parts) == sorted([f"{release.model_sha}.part", f"{release.eval_sha}.part"])


def test_chunks_already_held_are_not_requested_again_by_tick(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    h.updater.on_chunk(release.model_sha, 0, release.model[:64])
    h.updater.on_chunk(release.model_sha, 3, release.model[192:256])
    h.reporter.wants.clear()
    h.mono.advance(REQUEST_INTERVAL)
    h.updater.tick()
    assert dict(h.reporter.wants) == {release.model_sha: [(1, 3), (4, 5)], release.eval_sha: [(0, 3)]}


@pytest.mark.parametrize(
    ("target", "saved"),
    [
        ("agent.updater.verify_file", State.VERIFYING),
        ("agent.slots.SlotStore.stage", State.STAGED),
        ("agent.slots.SlotStore.commit", State.COMMITTED),
    ],
    ids=["verifying", "staged", "committed"],
)
def test_crash_in_other_states_resumes_by_the_table(
    target: str, saved: State, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    install_first(h)
    release = h.release(version=2)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash(target)

    monkeypatch.setattr(target, crash)
    h.updater.offer(release.desired)
    with pytest.raises(Crash):
        h.pump()
    assert h.updater.records.load_record().current is saved
    monkeypatch.undo()

    h.reporter.clear()
    h.restart().resume()
    assert h.reporter.final() == (release.deployment_id, UpdateState.COMMITTED, "")
    assert_idle(h)
    assert h.active_model_bytes() == release.model
    assert h.updater.slots.active_deployment() == release.deployment_id


def test_crash_between_recording_and_trusting_does_not_lose_the_deployment(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is saved first, the trusted state second; resume() repairs a crash in between."""
    h = harness
    install_first(h)
    release = h.release(version=2)
    trusted_before = h.updater.records.load_trusted()

    def save_trusted(trusted: Any) -> None:
        raise Crash("power cut right after the update record was written")

    monkeypatch.setattr(h.updater.records, "save_trusted", save_trusted)
    with pytest.raises(Crash):
        h.updater.offer(release.desired)
    assert h.updater.records.load_record().current is State.DOWNLOADING
    assert h.updater.records.load_trusted() == trusted_before
    monkeypatch.undo()

    h.reporter.clear()
    h.restart().resume()
    assert h.updater.records.load_trusted().deployment_id == release.deployment_id
    h.updater.offer(release.desired)  # the broker re-delivers the retained desired state: not a second install
    h.pump()
    assert h.reporter.final() == (release.deployment_id, UpdateState.COMMITTED, "")
    assert_idle(h)


def test_crash_mid_staging_resumes(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    install_first(h)
    release = h.release(version=2)

    def write(path: Path, value: Any) -> None:
        if path.name == "manifest.json":
            raise Crash("power cut after the files moved into the slot")
        atomic_write_json(path, value)

    monkeypatch.setattr("agent.slots.atomic_write_json", write)
    h.updater.offer(release.desired)
    with pytest.raises(Crash):
        h.pump()
    monkeypatch.undo()
    assert h.updater.records.load_record().current is State.STAGED
    assert h.slot_file("b").read_bytes() == release.model  # the verified bytes are on disk, in the slot

    h.reporter.clear()
    h.restart().resume()
    assert h.reporter.final() == (release.deployment_id, UpdateState.COMMITTED, "")
    assert h.active_model_bytes() == release.model


# -- storage and stalls ---------------------------------------------------------------------------


def test_disk_full_on_the_first_chunk_fails_cleanly(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    install_first(h)
    release = h.release(version=2)
    before = h.snapshot("slots", "active.json")
    h.updater.offer(release.desired)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    h.pump()
    assert h.reporter.states() == ["downloading", "failed"]
    assert "disk full" in h.reporter.final()[2]
    assert_idle(h)
    assert h.snapshot("slots", "active.json") == before


def test_disk_full_while_staging_via_atomic_write(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slot's manifest.json write hits ENOSPC after the files moved: failed, the half slot is not used."""
    h = harness
    first = install_first(h)
    release = h.release(version=2)

    def write(path: Path, value: Any) -> None:
        if path.name == "manifest.json" and "slots" in path.parts:
            raise storage_error(OSError(errno.ENOSPC, "No space left on device"), str(path))
        atomic_write_json(path, value)

    monkeypatch.setattr("agent.slots.atomic_write_json", write)
    h.install(release)
    assert h.reporter.states() == ["downloading", "verifying", "staged", "failed"]
    assert h.reporter.final()[2].startswith("disk full")
    assert_idle(h)
    assert h.active_model_bytes() == first.model
    assert h.updater.slots.active_slot() == "a"
    assert h.updater.slots.manifest("b") is None  # never a usable half slot
    assert not (h.data_dir / "slots" / "b").exists()  # nor a half slot left on the disk

    monkeypatch.undo()
    h.reporter.clear()
    third = h.release(version=3)
    h.install(third)
    assert h.reporter.states() == HAPPY
    assert h.active_model_bytes() == third.model


def test_disk_full_for_the_record_too_is_retried_once_space_is_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    install_first(h)
    release = h.release(version=2)
    real_stage = h.updater.slots.stage

    def stage(*args: Any, **kwargs: Any) -> str:
        enospc_when(lambda p: True, monkeypatch)  # the disk fills up just as staging starts: every write fails
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(h.updater.slots, "stage", stage)
    h.updater.offer(release.desired)
    try:
        h.pump()
    except StorageError:
        pass  # the service loop logs it; what matters is what happens next
    monkeypatch.undo()  # space is freed

    h.mono.advance(REQUEST_INTERVAL)
    h.updater.tick()
    assert h.updater.state is State.IDLE
    assert h.reporter.final()[0] == release.deployment_id


def test_a_reported_rollback_means_the_previous_model_is_active(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    first = install_first(h)
    release = h.release(version=2)
    real_replace, real_fsync = os.replace, shared.files._fsync_dir
    armed: list[bool] = []

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        if Path(dst) == h.active_pointer:
            armed.append(True)

    def fsync_dir(directory: Path) -> None:
        if armed:
            armed.clear()
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(directory)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shared.files, "_fsync_dir", fsync_dir)
    h.install(release)

    _, state, reason = h.reporter.final()
    if state is UpdateState.ROLLED_BACK:
        assert h.active_model_bytes() == first.model, f"rolled back ({reason}) but the new model is active"
    else:
        assert state is UpdateState.COMMITTED
        assert h.active_model_bytes() == release.model


def test_stalled_download_fails(harness: Harness) -> None:
    h = harness
    install_first(h)
    release = h.release(version=2)
    h.updater.offer(release.desired)
    h.reporter.unanswered.clear()  # the server never answers

    h.mono.advance(STALL_TIMEOUT - 1)
    h.updater.tick()  # re-asks (request interval passed), not yet stalled
    assert h.updater.state is State.DOWNLOADING
    assert len(h.reporter.wants) == 4

    h.mono.advance(2)
    h.updater.tick()
    assert h.reporter.states() == ["downloading", "failed"]
    assert "stalled" in h.reporter.final()[2]
    assert_idle(h)
    assert h.reporter.watching == set()
    assert not (h.data_dir / "downloads").exists()
    assert h.active_model_bytes() is not None


def test_progress_resets_the_stall_timer(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    h.reporter.unanswered.clear()
    h.mono.advance(STALL_TIMEOUT - 1)
    h.updater.on_chunk(release.model_sha, 0, release.model[:64])
    h.mono.advance(STALL_TIMEOUT - 1)
    h.updater.tick()
    assert h.updater.state is State.DOWNLOADING
    h.mono.advance(2)
    h.updater.tick()
    assert_idle(h)
    assert "stalled" in h.reporter.final()[2]


def test_tick_re_asks_only_after_the_request_interval(harness: Harness) -> None:
    h = harness
    release = h.release(version=1)
    h.updater.offer(release.desired)
    asked = len(h.reporter.wants)
    h.mono.advance(REQUEST_INTERVAL / 2)
    h.updater.tick()
    assert len(h.reporter.wants) == asked
    h.mono.advance(REQUEST_INTERVAL / 2)
    h.updater.tick()
    assert len(h.reporter.wants) == 2 * asked


def test_tick_while_idle_does_nothing(harness: Harness) -> None:
    h = harness
    h.mono.advance(10 * STALL_TIMEOUT)
    h.updater.tick()
    h.updater.request_missing()
    assert h.reporter.events == [] and h.reporter.wants == []
    assert h.updater.state is State.IDLE


def test_a_resume_the_disk_refuses_is_retried_by_tick_not_a_crash_loop(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarted during the trial with a full disk: resume() cannot save its roll-back. The agent runs
    on (the service logs it) and tick() tries again until the disk has room."""
    h = harness
    first = install_first(h)
    h.trial.hold = True
    h.install(h.release(version=2))
    assert h.updater.state is State.TRIAL
    refused = enospc_when(lambda p: p.name == "update-record.json", monkeypatch)

    h.restart()
    with pytest.raises(StorageError, match="disk full"):
        h.updater.resume()
    h.trial.hold = False
    trials = len(h.trial.requests)
    h.mono.advance(REQUEST_INTERVAL)
    with pytest.raises(StorageError):  # still full: tried again and refused again (the loop logs it)
        h.updater.tick()
    h.updater.tick()  # not again before the retry interval
    assert len(refused) == 2 and len(h.trial.requests) == trials  # and no trial started meanwhile

    monkeypatch.undo()
    h.mono.advance(REQUEST_INTERVAL)
    h.updater.tick()
    assert h.reporter.final()[1:] == (UpdateState.ROLLED_BACK, "agent restarted during trial")
    assert_idle(h)
    assert h.active_model_bytes() == first.model
