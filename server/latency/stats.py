"""Merging serving reports into numbers: counts add, histograms merge bucket by bucket.

Percentiles are always read off merged buckets, never averaged (an average of
p99s is not a p99 of anything).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.histogram import CallTally, LatencyHistogram


@dataclass(frozen=True)
class LatencyStats:
    """One merged histogram's numbers."""

    calls: int
    errors: int
    samples: int
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None


@dataclass
class Accumulator(CallTally):
    """Reports merged so far (``CallTally``), and the sources seen."""

    sources: set[str] = field(default_factory=set)

    def add_report(self, calls: int, errors: int, samples: int, invoke: dict[str, Any], e2e: dict[str, Any],
                   source: str) -> None:
        self.add(CallTally(calls, errors, samples, LatencyHistogram.from_json(invoke), LatencyHistogram.from_json(e2e)))
        self.sources.add(source)

    def add(self, other: CallTally) -> None:
        super().add(other)
        if isinstance(other, Accumulator):
            self.sources |= other.sources

    @classmethod
    def merged(cls, parts: Iterable[Accumulator]) -> Accumulator:
        result = cls()
        for part in parts:
            result.add(part)
        return result

    def stats(self) -> LatencyStats:
        invoke, e2e = self.invoke, self.e2e
        return LatencyStats(
            calls=self.calls, errors=self.errors, samples=self.samples,
            p50_ms=invoke.percentile(50), p90_ms=invoke.percentile(90), p95_ms=invoke.percentile(95),
            p99_ms=invoke.percentile(99), mean_ms=invoke.mean_ms(),
            e2e_p50_ms=e2e.percentile(50), e2e_p99_ms=e2e.percentile(99),
        )


def empty_stats() -> LatencyStats:
    return Accumulator().stats()


def stats_json(stats: LatencyStats) -> dict[str, Any]:
    """Flat keys; durations in milliseconds (``_ms``), None where no call was timed."""
    return {
        "calls": stats.calls, "errors": stats.errors, "samples": stats.samples,
        "p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "p95_ms": stats.p95_ms, "p99_ms": stats.p99_ms,
        "mean_ms": stats.mean_ms, "e2e_p50_ms": stats.e2e_p50_ms, "e2e_p99_ms": stats.e2e_p99_ms,
    }
