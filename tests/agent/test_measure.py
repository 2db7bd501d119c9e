"""The measurer: benchmark-only trials of signed candidates, never staged, never committed.

Real signatures and chunk hashing, a scripted trial and clock; each test checks what was reported and
that the update record, the trusted state and the slots are untouched.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.measure import Measurer
from shared.messages import BenchmarkResult, Command, MeasureOrder, SignedEnvelope
from shared.signing import KeyRole, TrustedKeys, envelope_digest, public_key_text, sign_envelope
from shared.trial import TrialResult
from tests.agent.fakes import FakeClock, ScriptedTrial
from tests.agent.material import BENCHMARK, DEVICE, NOW, Keys, Release, chunk_of, make_config, make_release


@dataclass
class Channel:
    results: list[tuple[str, BenchmarkResult | None, float | None, str | None]] = field(default_factory=list)
    wants: list[tuple[str, list[tuple[int, int]]]] = field(default_factory=list)
    watching: dict[str, set[int]] = field(default_factory=dict)

    def measured(self, measurement_id: str, benchmark: BenchmarkResult | None, accuracy: float | None,
                 samples: int | None, reason: str | None) -> None:
        self.results.append((measurement_id, benchmark, accuracy, reason))

    def want(self, sha256: str, ranges: list[tuple[int, int]]) -> None:
        self.wants.append((sha256, ranges))

    def watch_chunks(self, sha256: str, indices: Collection[int]) -> None:
        if indices:
            self.watching[sha256] = set(indices)
        else:
            self.watching.pop(sha256, None)


@dataclass
class Rig:
    measurer: Measurer
    channel: Channel
    trial: ScriptedTrial
    clock: FakeClock
    keys: Keys
    busy: list[str | None]
    data_dir: Path


@pytest.fixture
def rig(tmp_path: Path, keys: Keys) -> Rig:
    data_dir = tmp_path / "agent"
    config = make_config(data_dir, keys)
    trusted = TrustedKeys.from_text({KeyRole.RELEASE: [public_key_text(keys.release.public_key())],
                                     KeyRole.DIRECTOR: [public_key_text(keys.director.public_key())]})
    channel, trial, clock, busy = Channel(), ScriptedTrial(), FakeClock(NOW), [None]
    measurer = Measurer(config, channel, keys=lambda: trusted, release_counter=lambda: 3, busy=lambda: busy[0],
                        start=trial, clock=clock, monotonic=clock)
    return Rig(measurer, channel, trial, clock, keys, busy, data_dir)


def order(rig: Rig, release: Release, *, measurement_id: str = "m-1", device_id: str = DEVICE,
          signer: str = "director", expires: int = NOW + 600, pin: SignedEnvelope | None = None) -> Command:
    key = {"director": rig.keys.director, "release": rig.keys.release, "attacker": rig.keys.attacker}[signer]
    signed = sign_envelope(MeasureOrder(v=1, device_id=device_id, measurement_id=measurement_id,
                                        manifest_sha256=envelope_digest(pin or release.manifest_env),
                                        issued=NOW, expires=expires), key)
    return Command(v=1, name="measure", order=signed, manifest=release.manifest_env)


def deliver_all(rig: Rig, release: Release) -> None:
    for sha, data in release.blobs().items():
        for index in range(len(release.manifest.files[0 if sha == release.model_sha else 1].chunks)):
            rig.measurer.on_chunk(sha, index, chunk_of(data, index))


def candidate(rig: Rig, **kwargs: object) -> Release:
    return make_release(rig.keys, version=7, release_counter=3, profile="rpi5", threads=4, **kwargs)  # type: ignore[arg-type]


def test_a_signed_order_is_downloaded_timed_and_reported_then_forgotten(rig: Rig) -> None:
    release = candidate(rig)
    rig.measurer.offer(order(rig, release))
    assert {sha for sha, _ in rig.channel.wants} == {release.model_sha, release.eval_sha}
    deliver_all(rig, release)
    rig.measurer.tick()
    assert rig.channel.results == [("m-1", BENCHMARK, 0.95, None)]
    (request,) = rig.trial.requests
    assert request.previous_model_path is None and Path(request.model_path).name == f"{release.model_sha}.part"
    assert rig.channel.watching == {}  # no chunk subscription left behind
    assert not rig.data_dir.exists() or not [p for p in rig.data_dir.rglob("*") if p.is_file()]  # no slot, no record
    rig.measurer.offer(order(rig, release))  # the server's resend, after the result left
    assert len(rig.channel.results) == 1 and len(rig.trial.requests) == 1


@pytest.mark.parametrize(("tamper", "signer"), [
    ({"device_id": "someone-else"}, "director"),
    ({"expires": NOW - 1}, "director"),
    ({}, "release"),  # the release key cannot order a trial: only the director key can
    ({}, "attacker"),
])
def test_an_order_that_fails_a_check_touches_nothing_and_reports_nothing(
    rig: Rig, tamper: dict[str, object], signer: str
) -> None:
    rig.measurer.offer(order(rig, candidate(rig), signer=signer, **tamper))  # type: ignore[arg-type]
    assert rig.channel.results == [] and rig.channel.wants == [] and rig.trial.requests == []
    assert not (rig.data_dir / "measure").exists()


def test_an_order_pinning_another_manifest_is_refused(rig: Rig) -> None:
    release, other = candidate(rig), candidate(rig, model=b"x" * 300)
    rig.measurer.offer(order(rig, release, pin=other.manifest_env))
    assert rig.channel.wants == [] and rig.channel.results == []


def test_a_manifest_for_another_profile_is_refused(rig: Rig) -> None:
    rig.measurer.offer(order(rig, make_release(rig.keys, version=7, release_counter=3, profile="jetson-nano")))
    assert rig.channel.wants == []


def test_an_order_waits_while_an_install_runs_and_an_install_interrupts_a_measurement(rig: Rig) -> None:
    release = candidate(rig)
    rig.busy[0] = "the device is installing deployment dep-9"
    rig.measurer.offer(order(rig, release))
    assert rig.channel.wants == [] and rig.channel.results == []  # the server sends it again later
    rig.busy[0] = None
    rig.measurer.offer(order(rig, release))
    assert rig.channel.wants
    rig.busy[0] = "the device is installing deployment dep-10"
    rig.measurer.tick()
    assert rig.channel.results == [("m-1", None, None, "interrupted: the device is installing deployment dep-10")]
    assert rig.channel.watching == {} and not (rig.data_dir / "measure").exists()


def test_a_model_the_runtime_cannot_load_is_reported_with_its_reason(rig: Rig) -> None:
    rig.trial.result = TrialResult(ok=False, load_error=True, error="ai-edge-litert 2.3.0 cannot load model.tflite")
    release = candidate(rig)
    rig.measurer.offer(order(rig, release))
    deliver_all(rig, release)
    rig.measurer.tick()
    assert rig.channel.results == [("m-1", None, None, rig.trial.result.reason)]
    assert rig.trial.result.reason.startswith("load_error")


def test_a_stalled_download_ends_the_measurement(rig: Rig) -> None:
    rig.measurer.offer(order(rig, candidate(rig)))
    rig.clock.advance(10_000)
    rig.measurer.tick()
    assert rig.channel.results == [("m-1", None, None, "download stalled: no chunk arrived in time")]


def test_chunks_of_other_files_are_left_to_the_updater(rig: Rig) -> None:
    release = candidate(rig)
    assert rig.measurer.on_chunk(release.model_sha, 0, b"") is False  # nothing under way
    rig.measurer.offer(order(rig, release))
    assert rig.measurer.on_chunk("0" * 64, 0, b"") is False
    assert rig.measurer.on_chunk(release.model_sha, 0, chunk_of(release.model, 0)) is True


def test_a_restart_forgets_a_half_done_measurement(rig: Rig, keys: Keys) -> None:
    release = candidate(rig)
    rig.measurer.offer(order(rig, release))
    rig.measurer.on_chunk(release.model_sha, 0, chunk_of(release.model, 0))
    assert any((rig.data_dir / "measure").iterdir())
    Measurer(make_config(rig.data_dir, keys), Channel(), keys=lambda: TrustedKeys(), release_counter=lambda: 0,
             busy=lambda: None)
    assert not (rig.data_dir / "measure").exists()  # the server sends the order again on the hello
