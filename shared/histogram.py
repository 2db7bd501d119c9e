"""A mergeable latency histogram with fixed log-spaced buckets.

Every histogram of every agent uses the same bucket edges, so two of them
merge by adding counts: associative and exact, whatever the order, which lets
the server sum a device's intervals, a profile's devices or a rollout's
waves and read percentiles off the sum (averaging percentiles would be
wrong). Edges grow by ``2 ** (1/8)`` (each bucket about 9 % wide) from 1 µs;
every eighth edge is a power of two in microseconds, so a coarser view (for
Prometheus) is an exact re-grouping. Bucket 0 also holds anything faster
than 1 µs and the last bucket anything slower than about 100 s.

On the wire a histogram is its non-empty buckets as ``(index, count)``
pairs, with the sum (for the mean) and the scheme name, which a reader
checks before merging.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

SCHEME = "log2x8-1us"
BUCKETS_PER_OCTAVE = 8
LOWEST_MS = 0.001  # 1 µs
BUCKET_COUNT = 27 * BUCKETS_PER_OCTAVE  # up to 2**27 µs, about 134 s
_SCALE = BUCKETS_PER_OCTAVE / math.log(2.0)


def bucket_of(ms: float) -> int:
    """The bucket a duration in milliseconds falls into."""
    if not ms > LOWEST_MS:  # also NaN and negatives: clock noise, not a real duration
        return 0
    return min(int(math.log(ms / LOWEST_MS) * _SCALE), BUCKET_COUNT - 1)


def lower_edge_ms(index: int) -> float:
    return float(LOWEST_MS * 2.0 ** (index / BUCKETS_PER_OCTAVE))


def upper_edge_ms(index: int) -> float:
    return lower_edge_ms(index + 1)


@dataclass(frozen=True)
class WireHistogram:
    """A histogram as it travels: the scheme it was recorded with and its non-empty buckets."""

    scheme: str
    buckets: tuple[tuple[int, int], ...]  # (index, count), indices ascending, counts > 0
    sum_ms: float

    def __post_init__(self) -> None:
        if self.scheme != SCHEME:
            raise ValueError(f"unknown histogram scheme {self.scheme!r} (this side knows {SCHEME!r})")
        if len(self.buckets) > BUCKET_COUNT:
            raise ValueError("more buckets than the scheme has")
        last = -1
        for index, count in self.buckets:
            if not last < index < BUCKET_COUNT or count <= 0:
                raise ValueError(f"bad bucket ({index}, {count})")
            last = index
        if not (math.isfinite(self.sum_ms) and self.sum_ms >= 0):
            raise ValueError("sum_ms must be a finite, non-negative number")


class LatencyHistogram:
    """Counts per bucket, plus the sum of what was recorded. Not thread-safe: one writer, or a lock."""

    __slots__ = ("counts", "sum_ms")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.sum_ms = 0.0

    def record(self, ms: float) -> None:
        index = bucket_of(ms)
        self.counts[index] = self.counts.get(index, 0) + 1
        if ms > 0:
            self.sum_ms += ms

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.counts)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LatencyHistogram) and self.counts == other.counts
                and math.isclose(self.sum_ms, other.sum_ms, rel_tol=1e-9, abs_tol=1e-9))

    def __repr__(self) -> str:
        return f"LatencyHistogram(total={self.total}, sum_ms={self.sum_ms:.3f})"

    def add(self, other: LatencyHistogram) -> None:
        """Merge ``other`` into this one."""
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.sum_ms += other.sum_ms

    @classmethod
    def merged(cls, histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
        result = cls()
        for histogram in histograms:
            result.add(histogram)
        return result

    def mean_ms(self) -> float | None:
        total = self.total
        return self.sum_ms / total if total else None

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100) by numpy's default (linear) definition, from the buckets; None
        when empty. Each ranked value is placed log-linearly inside its bucket, so the result is within
        about one bucket (9 %) of what numpy computes on the raw samples."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        total = self.total
        if not total:
            return None
        rank = q / 100.0 * (total - 1)
        below = math.floor(rank)
        low = self._ranked(below)
        if rank == below:
            return low
        return low + (rank - below) * (self._ranked(below + 1) - low)

    def _ranked(self, rank: int) -> float:
        """An estimate of the ``rank``-th smallest value (0-based): its share of its bucket's width."""
        seen = 0
        for index in sorted(self.counts):
            count = self.counts[index]
            if rank < seen + count:
                within = (rank - seen + 0.5) / count
                low, high = lower_edge_ms(index), upper_edge_ms(index)
                return float(low * (high / low) ** within)
            seen += count
        return upper_edge_ms(max(self.counts))

    def cumulative(self, bounds_ms: Iterable[float]) -> list[int]:
        """How many recorded values are at most each bound (for Prometheus' ``le`` buckets).

        A bound that is a bucket's upper edge is exact; any other counts its whole bucket as above it.
        """
        ordered = sorted(self.counts.items())
        result = []
        for bound in bounds_ms:
            result.append(sum(count for index, count in ordered if upper_edge_ms(index) <= bound * (1 + 1e-12)))
        return result

    def to_wire(self) -> WireHistogram:
        return WireHistogram(SCHEME, tuple(sorted(self.counts.items())), self.sum_ms)

    @classmethod
    def from_wire(cls, wire: WireHistogram) -> LatencyHistogram:
        histogram = cls()
        histogram.counts = dict(wire.buckets)
        histogram.sum_ms = wire.sum_ms
        return histogram

    def to_json(self) -> dict[str, object]:
        """For storage: ``{"b": [[index, count], ...], "s": sum_ms}``."""
        return {"b": [[index, count] for index, count in sorted(self.counts.items())], "s": self.sum_ms}

    @classmethod
    def from_json(cls, value: object) -> LatencyHistogram:
        if not isinstance(value, dict):
            raise ValueError("a stored histogram is a JSON object")  # noqa: TRY004 - callers catch ValueError
        histogram = cls()
        for index, count in value.get("b", []):
            histogram.counts[int(index)] = histogram.counts.get(int(index), 0) + int(count)
        histogram.sum_ms = float(value.get("s", 0.0))
        return histogram


@dataclass
class CallTally:
    """Served calls added up: counts, and the invoke and end-to-end histograms. What the agent's recorder
    accumulates per interval and the server merges across reports; adding is exact and order-free."""

    calls: int = 0
    errors: int = 0
    samples: int = 0
    invoke: LatencyHistogram = field(default_factory=LatencyHistogram)
    e2e: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add(self, other: CallTally) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.samples += other.samples
        self.invoke.add(other.invoke)
        self.e2e.add(other.e2e)
