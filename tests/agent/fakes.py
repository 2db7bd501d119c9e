"""Small fakes around the Updater: a recording reporter, a scripted trial, fake clocks, and a harness.

The ``Harness`` plays the server's part: it answers every ``want`` with the
chunks asked for, like the server's broadcast, and can rebuild the Updater
from the same data directory to simulate a restart.
"""

from __future__ import annotations

import collections
import errno
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.states import State
from agent.updater import Updater
from shared.messages import BenchmarkResult, PreviousModel, UpdateState
from shared.trial import TrialRequest, TrialResult
from tests.agent.material import BENCHMARK, NOW, Keys, Release, chunk_of, make_release

# -- fakes -----------------------------------------------------------------------------


class RecordingReporter:
    """Collects everything the updater tells the outside world."""

    def __init__(self) -> None:
        self.events: list[tuple[str, UpdateState, str]] = []
        self.rejections: list[tuple[str, str]] = []
        self.telemetry_calls: list[tuple[str, BenchmarkResult, float, int, PreviousModel | None]] = []
        self.wants: list[tuple[str, list[tuple[int, int]]]] = []
        self.unanswered: collections.deque[tuple[str, list[tuple[int, int]]]] = collections.deque()
        self.watching: set[str] = set()
        self.watch_log: list[tuple[str, list[int]]] = []  # (file, the chunks listened for from then on)
        self.state_changes = 0

    def event(self, deployment_id: str, state: UpdateState, reason: str) -> None:
        self.events.append((deployment_id, state, reason))

    def rejected(self, claimed_deployment: str, reason: str) -> None:
        self.rejections.append((claimed_deployment, reason))

    def telemetry(
        self, deployment_id: str, benchmark: BenchmarkResult, accuracy: float, samples: int,
        previous: PreviousModel | None,
    ) -> None:
        self.telemetry_calls.append((deployment_id, benchmark, accuracy, samples, previous))

    def state_changed(self) -> None:
        self.state_changes += 1

    def want(self, sha256: str, ranges: list[tuple[int, int]]) -> None:
        self.wants.append((sha256, list(ranges)))
        self.unanswered.append((sha256, list(ranges)))

    def watch_chunks(self, sha256: str, indices: Collection[int]) -> None:
        self.watch_log.append((sha256, sorted(indices)))
        if indices:
            self.watching.add(sha256)
        else:
            self.watching.discard(sha256)

    # -- views for assertions --

    def states(self, deployment_id: str | None = None) -> list[str]:
        return [s.value for d, s, _ in self.events if deployment_id is None or d == deployment_id]

    def final(self, deployment_id: str | None = None) -> tuple[str, UpdateState, str]:
        finals = [e for e in self.events if e[1].is_final and (deployment_id is None or e[0] == deployment_id)]
        assert finals, f"no final event in {self.events}"
        return finals[-1]

    def clear(self) -> None:
        self.events.clear()
        self.rejections.clear()
        self.telemetry_calls.clear()
        self.wants.clear()
        self.unanswered.clear()
        self.watch_log.clear()
        self.state_changes = 0


OK_RESULT = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.95, samples=120)


class ScriptedHandle:
    """A trial under way that ends when the script says so (at once, unless ``hold`` is set)."""

    def __init__(self, trial: ScriptedTrial) -> None:
        self.trial = trial
        self.cancelled = False

    def poll(self) -> TrialResult | None:
        return None if self.trial.hold or self.cancelled else self.trial.result

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedTrial:
    """A trial starter returning a scripted result; ``during`` runs as the trial starts (to look or
    to crash); ``hold`` keeps every trial running until cleared, as a slow model would."""

    def __init__(self, result: TrialResult = OK_RESULT) -> None:
        self.result = result
        self.requests: list[TrialRequest] = []
        self.during: Callable[[TrialRequest], None] | None = None
        self.hold = False
        self.handles: list[ScriptedHandle] = []

    def __call__(self, request: TrialRequest) -> ScriptedHandle:
        self.requests.append(request)
        if self.during is not None:
            self.during(request)
        self.handles.append(ScriptedHandle(self))
        return self.handles[-1]


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Crash(Exception):
    """Stands for a power cut: raised from inside the updater, caught only by the test."""


# -- harness ---------------------------------------------------------------------------


@dataclass
class Harness:
    keys: Keys
    data_dir: Path
    config: AgentConfig
    reporter: RecordingReporter = field(default_factory=RecordingReporter)
    trial: ScriptedTrial = field(default_factory=ScriptedTrial)
    clock: FakeClock = field(default_factory=lambda: FakeClock(NOW))
    mono: FakeClock = field(default_factory=lambda: FakeClock(1000.0))
    blobs: dict[str, bytes] = field(default_factory=dict)
    updater: Updater = field(init=False)

    def __post_init__(self) -> None:
        self.updater = self.new_updater()

    available_memory: int | None = 2048 * 1024 * 1024

    def new_updater(self) -> Updater:
        """A fresh Updater on the same data directory: what a restarted agent builds."""
        return Updater(self.config, self.reporter, start_trial=self.trial, clock=self.clock, monotonic=self.mono,
                       available_memory=lambda: self.available_memory)

    def restart(self) -> Updater:
        self.updater = self.new_updater()
        return self.updater

    def release(self, **kwargs: Any) -> Release:
        release = make_release(self.keys, **kwargs)
        self.blobs.update(release.blobs())
        return release

    def pump(
        self,
        *,
        max_chunks: int | None = None,
        tamper: Callable[[str, int, bytes], bytes] | None = None,
    ) -> int:
        """Answer every outstanding ``want`` with the chunks asked for; returns how many were delivered."""
        delivered = 0
        while self.reporter.unanswered:
            sha, ranges = self.reporter.unanswered.popleft()
            blob = self.blobs[sha]
            for start, end in ranges:
                for index in range(start, end):
                    if max_chunks is not None and delivered >= max_chunks:
                        return delivered
                    data = chunk_of(blob, index)
                    if tamper is not None:
                        data = tamper(sha, index, data)
                    self.updater.on_chunk(sha, index, data)
                    delivered += 1
        return delivered

    def install(self, release: Release) -> None:
        self.updater.offer(release.desired)
        self.pump()

    # -- what is on disk --

    @property
    def active_pointer(self) -> Path:
        return self.data_dir / "active.json"

    @property
    def trusted_path(self) -> Path:
        return self.data_dir / "trusted.json"

    @property
    def record_path(self) -> Path:
        return self.data_dir / "update-record.json"

    def slot_file(self, slot: str, name: str = "model.tflite") -> Path:
        return self.data_dir / "slots" / slot / name

    def snapshot(self, *parts: str) -> dict[str, bytes]:
        """Every file under the data directory (or under ``parts`` of it), by relative path, as bytes."""
        roots = [self.data_dir / p for p in parts] if parts else [self.data_dir]
        out: dict[str, bytes] = {}
        for root in roots:
            if root.is_file():
                out[str(root.relative_to(self.data_dir))] = root.read_bytes()
            elif root.is_dir():
                for path in sorted(root.rglob("*")):
                    if path.is_file():
                        out[str(path.relative_to(self.data_dir))] = path.read_bytes()
        return out

    def active_model_bytes(self) -> bytes | None:
        slot = self.updater.slots.active_slot()
        return None if slot is None else self.slot_file(slot).read_bytes()



def assert_idle(h: Harness) -> None:
    assert h.updater.state is State.IDLE
    assert h.updater.records.load_record().current is State.IDLE


HAPPY = ["downloading", "verifying", "staged", "trial", "committed"]
UNTIL_TRIAL = ["downloading", "verifying", "staged", "trial"]


def install_first(h: Harness, **kwargs: Any) -> Release:
    """Install v1 (slot a) so every scenario has a previous model to keep or replace."""
    first = h.release(version=1, **kwargs)
    h.install(first)
    assert h.reporter.final(first.deployment_id)[1] is UpdateState.COMMITTED
    assert h.updater.slots.active_slot() == "a"
    h.reporter.clear()
    return first


def settle_corrupt_download(h: Harness, tamper: Callable[[str, int, bytes], bytes], rounds: int = 40) -> int:
    """Let the updater re-ask for dropped chunks (its tick, soon after a corrupt copy) and answer every
    request through ``tamper``, until the download ends; returns how many requests it took."""
    from agent.download import CORRUPT_RETRY_S

    for asked in range(rounds):
        if h.updater.state is not State.DOWNLOADING:
            return asked
        h.mono.advance(CORRUPT_RETRY_S)
        h.updater.tick()
        h.pump(tamper=tamper)
    raise AssertionError(f"still downloading after {rounds} requests")


def enospc_when(predicate: Callable[[Path], bool], monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make ``os.replace`` fail with ENOSPC for destinations matching ``predicate``; returns the refused paths."""
    real_replace = os.replace
    refused: list[Path] = []

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if predicate(Path(dst)):
            refused.append(Path(dst))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return refused
