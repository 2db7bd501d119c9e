"""The trial child's result line (``shared.trial.TrialResult``) round-trips through the strict codec,
``paired`` included, and a line without ``paired`` (the candidate's provisional result, or a child that
predates the field) still decodes."""

from __future__ import annotations

import json

from shared.codec import decode, encode
from shared.messages import BenchmarkResult
from shared.trial import TrialResult

BENCH = BenchmarkResult(
    runtime="ai-edge-litert 2.3.0", threads=1, init_ms=3.0, first_ms=1.2, warmup_runs=2, runs=50, mean_ms=1.1,
    std_ms=0.1, min_ms=0.9, max_ms=2.0, p50_ms=1.0, p90_ms=1.4, p95_ms=1.6, p99_ms=1.9, peak_rss_bytes=40_000_000,
)


def test_a_paired_result_round_trips() -> None:
    result = TrialResult(ok=True, benchmark=BENCH, accuracy=0.9, samples=60, previous_benchmark=BENCH,
                         previous_accuracy=0.91, paired=True)
    line = json.dumps(encode(result))
    assert decode(TrialResult, json.loads(line)) == result


def test_a_result_without_paired_decodes_as_not_paired() -> None:
    data = encode(TrialResult(ok=True, benchmark=BENCH, accuracy=0.9, samples=60))
    del data["paired"]
    assert decode(TrialResult, data).paired is False
