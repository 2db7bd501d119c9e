"""shared.benchmark against scripted models on a fake clock: the timing loops, the interleaving, the statistics.

A ``ScriptedModel`` advances the fake clock by its run time on every run, and
writes its name into a shared log, so a test sees the order of the runs and
controls what each run costs, including a burst of load from elsewhere that
makes every run slower for a while. No sleeping, no real interpreter: the
real runs are ``tests/agent/test_trial_real.py``'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from shared.backends import RuntimeInfo
from shared.benchmark import (
    MAX_BLOCK_RUNS,
    BenchmarkSettings,
    benchmark_loaded,
    benchmark_pair,
    block_runs,
    summarize_runs,
)
from shared.errors import ModelError
from shared.messages import BenchmarkResult


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedModel:
    """A loaded model whose runs take ``run_ms(now_ms)`` milliseconds of the fake clock."""

    info = RuntimeInfo("scripted", "1.0")

    def __init__(self, name: str, clock: FakeClock, run_ms: Callable[[float], float], log: list[str]) -> None:
        self.name, self.clock, self.run_ms, self.log = name, clock, run_ms, log
        self.times: list[float] = []  # every run's cost, in order

    def prepare(self, sample: Any) -> Any:
        return sample

    def run_prepared(self, tensor: Any) -> None:
        cost = self.run_ms(self.clock.now * 1000)
        self.log.append(self.name)
        self.times.append(cost)
        self.clock.now += cost / 1000


def steady(ms: float) -> Callable[[float], float]:
    return lambda now_ms: ms


def burst(ms: float, start_ms: float, end_ms: float, factor: float = 2.0) -> Callable[[float], float]:
    """``ms`` a run, ``factor`` times that while the machine is busy elsewhere, from start_ms to end_ms."""
    return lambda now_ms: ms * factor if start_ms <= now_ms < end_ms else ms


def settings(**overrides: Any) -> BenchmarkSettings:
    fields: dict[str, Any] = {"warmup_runs": 1, "warmup_seconds": 0.0, "min_runs": 20, "min_seconds": 0.0}
    fields.update(overrides)
    return BenchmarkSettings(**fields)


def runs_of(log: list[str]) -> list[tuple[str, int]]:
    """The log as (model, consecutive runs) blocks."""
    return [(name, len(list(group))) for name, group in itertools.groupby(log)]


@dataclass(frozen=True)
class PairRun:
    a: ScriptedModel
    b: ScriptedModel
    result_a: BenchmarkResult
    result_b: BenchmarkResult
    log: list[str]


def pair(a_ms: Callable[[float], float], b_ms: Callable[[float], float], **overrides: Any) -> PairRun:
    """``benchmark_pair`` of model a (loaded in 3 ms) and model b (4 ms), 2 threads, on one fake clock."""
    clock, log = FakeClock(), []
    a, b = ScriptedModel("a", clock, a_ms, log), ScriptedModel("b", clock, b_ms, log)
    result_a, result_b = benchmark_pair(a, b, "sample", init_ms=(3.0, 4.0), threads=2, settings=settings(**overrides),
                                        clock=clock)
    return PairRun(a, b, result_a, result_b, log)


# -- the statistics -----------------------------------------------------------------------------


def test_the_statistics_of_a_list_of_runs() -> None:
    model = ScriptedModel("a", FakeClock(), steady(1.0), [])
    result = summarize_runs(model, [4.0, 1.0, 3.0, 2.0], threads=2, init_ms=5.123456, first_ms=7.0, warmup_runs=3,
                            peak_rss=123)
    assert result == BenchmarkResult(
        runtime="scripted 1.0", threads=2, init_ms=5.1235, first_ms=7.0, warmup_runs=3, runs=4,
        mean_ms=2.5, std_ms=1.118, min_ms=1.0, max_ms=4.0,
        p50_ms=2.5, p90_ms=3.7, p95_ms=3.85, p99_ms=3.97, peak_rss_bytes=123,
    )


def test_a_model_timed_alone_is_summarized_from_its_own_timed_runs() -> None:
    clock, log = FakeClock(), []
    costs = iter([9.0, 5.0, 5.0] + [1.0, 2.0, 3.0, 4.0] * 5)  # first run, two warm-up runs, 20 timed runs
    model = ScriptedModel("a", clock, lambda now_ms: next(costs), log)

    result = benchmark_loaded(model, "sample", init_ms=3.0, threads=1, settings=settings(warmup_runs=2), clock=clock)

    assert len(log) == 23
    assert (result.first_ms, result.warmup_runs, result.runs) == (9.0, 2, 20)
    expected = summarize_runs(model, model.times[3:], threads=1, init_ms=3.0, first_ms=9.0, warmup_runs=2,
                              peak_rss=result.peak_rss_bytes)
    assert result == expected
    assert (result.min_ms, result.p50_ms, result.max_ms) == (1.0, 2.5, 4.0)


# -- the interleaving ----------------------------------------------------------------------------


def test_a_block_lasts_about_five_milliseconds_of_warm_runs() -> None:
    assert block_runs(1.0) == 5
    assert block_runs(0.5) == 10
    assert block_runs(4.0) == 1
    assert block_runs(20.0) == 1  # a slow model still runs, one run a block
    assert block_runs(0.001) == MAX_BLOCK_RUNS  # a fast one does not run thousands in a row
    assert block_runs(0.0) == MAX_BLOCK_RUNS  # a clock too coarse to time one run


def test_the_two_models_run_in_alternating_blocks_until_both_have_their_runs() -> None:
    run = pair(steady(1.0), steady(0.5), min_runs=20)

    # Each model's first run and warm-up, then alternating blocks: 5 runs of a (5 ms), 10 of b (5 ms).
    assert runs_of(run.log[:4]) == [("a", 2), ("b", 2)]
    assert runs_of(run.log[4:]) == [("a", 5), ("b", 10)] * 4
    assert (run.result_a.runs, run.result_b.runs) == (20, 40)  # b went on while a reached its minimum
    assert (run.result_a.warmup_runs, run.result_b.warmup_runs) == (1, 1)
    assert (run.result_a.init_ms, run.result_b.init_ms) == (3.0, 4.0)
    assert run.result_a.threads == run.result_b.threads == 2
    assert run.result_a.peak_rss_bytes == run.result_b.peak_rss_bytes > 0  # the process's, with both loaded


def test_each_model_runs_until_its_own_runs_add_up_to_min_seconds() -> None:
    run = pair(steady(1.0), steady(2.0), min_runs=1, min_seconds=0.1)

    # a needs 100 runs of 1 ms (20 blocks of 5), b 50 runs of 2 ms (25 blocks of 2: 5 ms / 2 ms rounds to 2),
    # and a keeps running while b catches up: 25 rounds
    assert runs_of(run.log[4:]) == [("a", 5), ("b", 2)] * 25
    assert (run.result_a.runs, run.result_b.runs) == (125, 50)
    assert sum(run.a.times[2:]) >= 100 and sum(run.b.times[2:]) >= 100


def test_the_pair_is_summarized_like_a_model_timed_alone() -> None:
    costs = itertools.cycle([1.0, 1.5, 0.5, 3.0, 1.0])
    run = pair(lambda now_ms: next(costs), steady(1.0), min_runs=30)

    for result, model, init_ms in ((run.result_a, run.a, 3.0), (run.result_b, run.b, 4.0)):
        assert result == summarize_runs(model, model.times[2:], threads=2, init_ms=init_ms, first_ms=model.times[0],
                                        warmup_runs=1, peak_rss=result.peak_rss_bytes)


def test_a_pair_of_slow_models_stops_after_max_seconds() -> None:
    run = pair(steady(1000.0), steady(1000.0), min_runs=100, max_seconds=3.0)
    assert (run.result_a.runs, run.result_b.runs) == (2, 2)  # 4 s of blocks of one run, then the escape


def test_a_model_that_cannot_take_the_sample_is_a_model_error() -> None:
    clock, log = FakeClock(), []
    good = ScriptedModel("a", clock, steady(1.0), log)
    wrong = ScriptedModel("b", clock, steady(1.0), log)

    def refuse(sample: Any) -> Any:
        raise ValueError("cannot reshape array of size 4 into shape (1,7)")

    wrong.prepare = refuse  # type: ignore[method-assign]
    with pytest.raises(ModelError, match="benchmark failed: cannot reshape"):
        benchmark_pair(good, wrong, "sample", init_ms=(1.0, 1.0), threads=1, settings=settings(), clock=clock)


# -- why: a burst of load elsewhere on the machine ------------------------------------------------


def test_a_burst_of_load_skews_sequential_timing_but_not_the_interleaved_ratio() -> None:
    """Two identical 1 ms models; from 50 ms to 150 ms every run takes twice as long (another process,
    the agent serving traffic). Timed one after the other, the burst lands on the first model only and
    its p95 doubles; timed interleaved, it lands on both, and the ratio the gates read stays 1."""
    load = burst(1.0, start_ms=50.0, end_ms=150.0)
    run = settings(min_runs=200)

    clock, log = FakeClock(), []
    first, second = ScriptedModel("a", clock, load, log), ScriptedModel("b", clock, load, log)
    alone_a = benchmark_loaded(first, "sample", init_ms=1.0, threads=1, settings=run, clock=clock)
    alone_b = benchmark_loaded(second, "sample", init_ms=1.0, threads=1, settings=run, clock=clock)
    assert alone_a.p95_ms / alone_b.p95_ms == pytest.approx(2.0)  # over max_latency_ratio 1.5: a false roll-back

    paired = pair(load, load, min_runs=200)
    slowed = [sum(1 for t in model.times[2:] if t > 1.0) for model in (paired.a, paired.b)]
    assert slowed[0] > 0.05 * paired.result_a.runs and slowed[1] > 0.05 * paired.result_b.runs  # it hit both
    assert paired.result_a.p95_ms / paired.result_b.p95_ms == pytest.approx(1.0)
