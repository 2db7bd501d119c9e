"""The latency histogram: merging is exact and order-free, percentiles land in the right bucket."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import decode, encode
from shared.errors import ProtocolError
from shared.histogram import (
    BUCKET_COUNT,
    SCHEME,
    LatencyHistogram,
    WireHistogram,
    bucket_of,
    lower_edge_ms,
    upper_edge_ms,
)

# within the scheme's range (1 µs to 134 s): beyond it the end buckets hold everything, by design
durations = st.floats(min_value=0.001, max_value=100_000.0, allow_nan=False, allow_infinity=False)
samples = st.lists(durations, min_size=0, max_size=200)


def histogram_of(values: list[float]) -> LatencyHistogram:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    return histogram


def merged(*histograms: LatencyHistogram) -> LatencyHistogram:
    return LatencyHistogram.merged(histograms)


@given(samples, samples, samples)
def test_merge_is_associative_and_commutative(a: list[float], b: list[float], c: list[float]) -> None:
    ha, hb, hc = histogram_of(a), histogram_of(b), histogram_of(c)
    left = merged(merged(ha, hb), hc)
    right = merged(ha, merged(hb, hc))
    assert left == right
    assert merged(hb, ha) == merged(ha, hb)
    assert left == histogram_of(a + b + c)  # merging loses nothing recording all at once would keep
    assert left.total == len(a) + len(b) + len(c)


@settings(max_examples=200)
@given(st.lists(durations, min_size=1, max_size=400), st.sampled_from([0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0]))
def test_percentile_is_within_one_bucket_of_numpys(values: list[float], q: float) -> None:
    estimate = histogram_of(values).percentile(q)
    truth = float(np.percentile(values, q))
    assert estimate is not None
    assert abs(bucket_of(estimate) - bucket_of(truth)) <= 1, (estimate, truth)


@given(st.lists(samples, min_size=1, max_size=6))
def test_percentiles_of_merged_intervals_match_the_whole(intervals: list[list[float]]) -> None:
    everything = [value for interval in intervals for value in interval]
    combined = merged(*(histogram_of(interval) for interval in intervals))
    if not everything:
        assert combined.percentile(50) is None
        return
    for q in (50.0, 90.0, 99.0):
        estimate = combined.percentile(q)
        assert estimate is not None
        assert abs(bucket_of(estimate) - bucket_of(float(np.percentile(everything, q)))) <= 1


@given(samples)
def test_wire_and_storage_forms_round_trip(values: list[float]) -> None:
    histogram = histogram_of(values)
    wire = decode(WireHistogram, encode(histogram.to_wire()))
    assert LatencyHistogram.from_wire(wire) == histogram
    assert LatencyHistogram.from_json(histogram.to_json()) == histogram


def test_bucket_edges_are_log_spaced_from_one_microsecond() -> None:
    assert bucket_of(0.0) == bucket_of(-1.0) == bucket_of(float("nan")) == 0
    assert bucket_of(10**9) == BUCKET_COUNT - 1
    for index in (1, 8, 80, 200):
        assert bucket_of(lower_edge_ms(index) * 1.0001) == index
        assert upper_edge_ms(index) / lower_edge_ms(index) == pytest.approx(2 ** (1 / 8))
    assert lower_edge_ms(8) == pytest.approx(0.002)  # every eighth edge is a power of two in µs


def test_cumulative_counts_at_power_of_two_bounds_are_exact() -> None:
    values = [0.0031, 0.5, 0.9, 1.0, 1.5, 3.9, 120.0]
    histogram = histogram_of(values)
    bounds = [2.0**k / 1000 for k in range(27)]  # 1 µs .. 67 s, all bucket edges
    expected = [sum(v <= b for v in values) for b in bounds]
    # a value exactly on an edge belongs to the bucket above it, like Prometheus' le (<=) only for values
    # below the edge; 1.0 ms is not an edge (2**k µs), so nothing here sits on one
    assert histogram.cumulative(bounds) == expected


def test_an_empty_histogram_has_no_percentiles_and_bad_input_is_refused() -> None:
    empty = LatencyHistogram()
    assert empty.percentile(99) is None and empty.mean_ms() is None and not empty
    with pytest.raises(ValueError):
        empty.percentile(101)
    for bad in (
        {"scheme": "linear", "buckets": [], "sum_ms": 0.0},
        {"scheme": SCHEME, "buckets": [[3, 1], [2, 1]], "sum_ms": 0.0},
        {"scheme": SCHEME, "buckets": [[3, 0]], "sum_ms": 0.0},
        {"scheme": SCHEME, "buckets": [[BUCKET_COUNT, 1]], "sum_ms": 0.0},
        {"scheme": SCHEME, "buckets": [], "sum_ms": -1.0},
    ):
        with pytest.raises(ProtocolError):
            decode(WireHistogram, bad)
