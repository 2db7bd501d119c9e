"""Every call's latency, per served model version, in mergeable histograms.

``record`` (from the endpoint's threads, under one lock) adds a call's
interpreter time (the sum of its invokes) and its end-to-end time inside the
agent to the accumulator of the model that answered it, keyed by
``(model, version, sha256, source)``. ``swap`` (from the agent's loop) takes
the accumulators out and starts new ones, so no call falls between two
intervals: each one is in exactly one swap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.serving.host import ModelSource
from shared.histogram import CallTally

TRAFFIC, REBENCHMARK = "traffic", "rebenchmark"

Key = tuple[str, int, str, str]  # model, version, sha256, source


@dataclass(kw_only=True)
class Accumulator(CallTally):
    """One model version's calls over [start, end]."""

    source: ModelSource
    runtime: str
    threads: int
    origin: str  # TRAFFIC or REBENCHMARK
    start: float
    end: float

    @property
    def key(self) -> Key:
        return (self.source.model, self.source.version, self.source.sha256, self.origin)

    def merge(self, other: Accumulator) -> None:
        """Add a later interval of the same key (histograms merge exactly)."""
        self.start, self.end = min(self.start, other.start), max(self.end, other.end)
        self.add(other)


class LatencyRecorder:
    def __init__(self, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._interval_start = clock()
        self._accumulators: dict[Key, Accumulator] = {}
        self.last_traffic = monotonic()  # the last call an application made (re-benchmarks do not count)

    def _accumulator(self, source: ModelSource, runtime: str, threads: int, origin: str) -> Accumulator:
        key = (source.model, source.version, source.sha256, origin)
        acc = self._accumulators.get(key)
        if acc is None:
            acc = self._accumulators[key] = Accumulator(source=source, runtime=runtime, threads=threads,
                                                        origin=origin, start=self._interval_start,
                                                        end=self._interval_start)
        return acc

    def record(self, source: ModelSource, runtime: str, threads: int, *, invoke_ms: float, e2e_ms: float,
               samples: int, origin: str = TRAFFIC) -> None:
        """One successful call."""
        with self._lock:
            acc = self._accumulator(source, runtime, threads, origin)
            acc.calls += 1
            acc.samples += samples
            acc.invoke.record(invoke_ms)
            acc.e2e.record(e2e_ms)
            if origin == TRAFFIC:
                self.last_traffic = self.monotonic()

    def error(self, source: ModelSource, runtime: str, threads: int, *, origin: str = TRAFFIC) -> None:
        """One call the served model did not answer (bad input, a failed run)."""
        with self._lock:
            acc = self._accumulator(source, runtime, threads, origin)
            acc.calls += 1
            acc.errors += 1
            if origin == TRAFFIC:
                self.last_traffic = self.monotonic()

    def swap(self) -> list[Accumulator]:
        """The accumulators since the last swap, each ending now; new calls go into new ones."""
        with self._lock:
            now = self.clock()
            taken, self._accumulators = list(self._accumulators.values()), {}
            self._interval_start = now
        for acc in taken:
            acc.end = max(acc.start, now)
        return taken
