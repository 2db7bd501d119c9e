"""The runtime stand-in of a simulated device: trials that report configured numbers, and no serving.

Everything before the trial is the real agent's (signatures, root of trust,
chunked download, hash checks, slots); the trial is where a real device loads
the model in a child process. A simulated one answers instead with the
configured latency and accuracy, a little jitter on each, and by default the
accuracy the host measured for this very variant (its manifest's
``reference.host_accuracy``), so a faithful fleet passes the gates the way
real devices would. A fixed fraction of the devices, chosen by their id so a
rerun picks the same ones, report an accuracy far below it and fail the gates.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

from agent.files import read_json
from agent.updater import TrialStarter
from shared.codec import decode
from shared.errors import ConfigError, EdgefleetError
from shared.messages import BenchmarkResult, Manifest
from shared.trial import TrialHandle, TrialRequest, TrialResult

RUNTIME_NAME = "simulated"
RUNTIME_VERSION = "1"
SAMPLES = 100  # what a simulated trial says it evaluated
FAILING_ACCURACY_DROP = 0.5  # how far below its accuracy a failing device reports: far beyond any gate


@dataclass(frozen=True)
class SimulatedRuntime:
    p50_ms: float = 2.0
    p95_ms: float = 3.0
    accuracy: float | None = None  # None: the host accuracy of the variant on trial, from its manifest
    fail_fraction: float = 0.0
    trial_seconds: float = 0.0  # how long a trial takes
    jitter: float = 0.05  # each latency is off by up to this fraction, each accuracy by a tenth of it

    def __post_init__(self) -> None:
        if not 0 < self.p50_ms <= self.p95_ms:
            raise ConfigError(f"latency must be 0 < p50 <= p95 ms, got {self.p50_ms:g},{self.p95_ms:g}")
        if self.accuracy is not None and not 0 <= self.accuracy <= 1:
            raise ConfigError(f"accuracy must be between 0 and 1, got {self.accuracy:g}")
        if not 0 <= self.fail_fraction <= 1:
            raise ConfigError(f"the failing fraction must be between 0 and 1, got {self.fail_fraction:g}")
        if self.trial_seconds < 0 or not 0 <= self.jitter < 1:
            raise ConfigError("trial time must be >= 0 s and jitter between 0 and 1")

    def fails(self, device_id: str) -> bool:
        """Whether this device's trials fail their gates: the same devices on every run."""
        digest = hashlib.sha256(device_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fail_fraction

    def starter(self, device_id: str) -> TrialStarter:
        """The ``start_trial`` of one device's ``Updater``."""
        rng = random.Random(device_id)
        failing = self.fails(device_id)

        def start(request: TrialRequest) -> TrialHandle:
            try:
                result = self.result(request, rng, failing)
            except (EdgefleetError, OSError, ValueError) as exc:  # e.g. an unreadable slot manifest
                result = TrialResult(ok=False, error=f"simulated trial: {exc}")
            return SimulatedTrial(result, time.monotonic() + self.trial_seconds)

        return start

    def result(self, request: TrialRequest, rng: random.Random, failing: bool = False) -> TrialResult:
        accuracy = self._accuracy(request.model_path, rng)
        if failing:
            accuracy = max(0.0, accuracy - FAILING_ACCURACY_DROP)
        previous_benchmark = previous_accuracy = None
        if request.previous_model_path is not None:
            previous_benchmark = self._benchmark(request, rng)
            previous_accuracy = self._accuracy(request.previous_model_path, rng)
        return TrialResult(
            ok=True, benchmark=self._benchmark(request, rng), accuracy=accuracy, samples=SAMPLES,
            previous_benchmark=previous_benchmark, previous_accuracy=previous_accuracy,
            paired=previous_benchmark is not None,
        )

    def _accuracy(self, model_path: str, rng: random.Random) -> float:
        if self.accuracy is not None:
            base = self.accuracy
        else:
            manifest = decode(Manifest, read_json(Path(model_path).parent / "manifest.json"))  # the slot's
            base = manifest.reference.host_accuracy
        return min(1.0, max(0.0, base + rng.uniform(-self.jitter, self.jitter) / 10))

    def _benchmark(self, request: TrialRequest, rng: random.Random) -> BenchmarkResult:
        def jittered(value: float) -> float:
            return value * (1 + rng.uniform(-self.jitter, self.jitter))

        p50 = jittered(self.p50_ms)
        p95 = max(p50, jittered(self.p95_ms))
        return BenchmarkResult(
            runtime=RUNTIME_NAME, threads=request.threads, init_ms=1.0, first_ms=p95, warmup_runs=request.warmup_runs,
            runs=request.min_runs, mean_ms=(p50 + p95) / 2, std_ms=(p95 - p50) / 2, min_ms=p50 * 0.9, max_ms=p95 * 1.2,
            p50_ms=p50, p90_ms=p50 + (p95 - p50) * 0.8, p95_ms=p95, p99_ms=p95 * 1.1, peak_rss_bytes=32 * 1024 * 1024,
        )


class SimulatedTrial:
    """A trial whose result is known up front and handed out once its time is up."""

    def __init__(self, result: TrialResult, ready_at: float) -> None:
        self._result = result
        self._ready_at = ready_at

    def poll(self) -> TrialResult | None:
        return self._result if time.monotonic() >= self._ready_at else None

    def cancel(self) -> None:
        pass


class NoServing:
    """A simulated device serves no inference and sends no serving reports."""

    def start(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def tick(self) -> None:
        pass

    def stop(self) -> None:
        pass
