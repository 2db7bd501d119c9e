"""Latency measurement the way TFLite's ``benchmark_model`` does it.

Init time, first inference, a warm-up phase, then at least ``min_runs`` runs
and at least ``min_seconds`` of timed runs; mean, std, min, max and
percentiles of those runs; peak resident memory of the process. The server
(host evaluation) and the agent (on-device trial) both call this.

``benchmark_pair`` times two models A/B style, for a comparison: both are
loaded, each has its first run and warm-up, then their timed runs alternate
in blocks of about ``BLOCK_SECONDS`` each (A's block, B's block, A's, ...),
so a burst of load from elsewhere on the machine lands on both alike instead
of on whichever happened to run alone at the time. A block is long enough
for the model's caches to stay warm within it and short enough that both
models see the same seconds.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from shared.backends import RuntimeInfo
from shared.errors import ModelError
from shared.interpreter import TFLiteModel
from shared.messages import BenchmarkResult

Clock = Callable[[], float]  # seconds; time.perf_counter unless a test drives it

BLOCK_SECONDS = 0.005  # how long one interleaved block of a model's runs lasts, about
MAX_BLOCK_RUNS = 50  # ... in runs at most, for a model so fast the block would be thousands of runs


@dataclass(frozen=True)
class BenchmarkSettings:
    warmup_runs: int = 1
    warmup_seconds: float = 0.5
    min_runs: int = 50
    min_seconds: float = 1.0
    max_seconds: float = 150.0


class BenchmarkedModel(Protocol):
    """What timing needs of a loaded model: ``TFLiteModel``, or a scripted stand-in in the unit tests."""

    @property
    def info(self) -> RuntimeInfo: ...

    def prepare(self, sample: Any) -> Any: ...

    def run_prepared(self, tensor: Any) -> None: ...


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values, q in [0, 100]."""
    if not sorted_values:
        raise ValueError("no values")
    rank = (len(sorted_values) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux from VmHWM, because ru_maxrss
    survives exec and would report a big parent's peak for a fresh child."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> None:
    """Start this process's peak resident memory again from what it holds now (Linux 4.0+), so a second
    model measured in the same process reports its own peak, not the first one's. Elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


@dataclass(frozen=True)
class _Warm:
    """A model ready for its timed runs: its prepared input, first run and warm-up."""

    tensor: Any
    first_ms: float
    warmup_runs: int
    warm_ms: float  # one warm run, on average over the warm-up (the first run when there was none)


def summarize_runs(
    model: BenchmarkedModel, times_ms: list[float], *, threads: int, init_ms: float, first_ms: float,
    warmup_runs: int, peak_rss: int,
) -> BenchmarkResult:
    """The BenchmarkResult of ``model``'s timed runs ``times_ms`` (at least one)."""
    ordered = sorted(times_ms)
    mean = sum(times_ms) / len(times_ms)
    std = math.sqrt(sum((t - mean) ** 2 for t in times_ms) / len(times_ms))
    return BenchmarkResult(
        runtime=f"{model.info.name} {model.info.version}",
        threads=threads,
        init_ms=round(init_ms, 4),
        first_ms=round(first_ms, 4),
        warmup_runs=warmup_runs,
        runs=len(times_ms),
        mean_ms=round(mean, 4),
        std_ms=round(std, 4),
        min_ms=round(ordered[0], 4),
        max_ms=round(ordered[-1], 4),
        p50_ms=round(percentile(ordered, 50), 4),
        p90_ms=round(percentile(ordered, 90), 4),
        p95_ms=round(percentile(ordered, 95), 4),
        p99_ms=round(percentile(ordered, 99), 4),
        peak_rss_bytes=peak_rss,
    )


def with_timed_runs(result: BenchmarkResult, timed: BenchmarkResult) -> BenchmarkResult:
    """``result`` with the warm-up and timed runs of ``timed`` (another measurement of the same model);
    its load time, first run and peak memory stay."""
    return replace(
        result, warmup_runs=timed.warmup_runs, runs=timed.runs, mean_ms=timed.mean_ms, std_ms=timed.std_ms,
        min_ms=timed.min_ms, max_ms=timed.max_ms, p50_ms=timed.p50_ms, p90_ms=timed.p90_ms,
        p95_ms=timed.p95_ms, p99_ms=timed.p99_ms,
    )


def load_model(
    model_path: str, *, threads: int = 1, runtime: str | None = None, memory_budget_bytes: int | None = None,
) -> tuple[TFLiteModel, float]:
    """Load ``model_path``; returns the model and how long loading took (init_ms)."""
    start = time.perf_counter()
    model = TFLiteModel(model_path, threads=threads, runtime=runtime, memory_budget_bytes=memory_budget_bytes)
    return model, (time.perf_counter() - start) * 1000


def benchmark_model(
    model_path: str,
    sample: Any,
    *,
    threads: int = 1,
    settings: BenchmarkSettings = BenchmarkSettings(),
    runtime: str | None = None,
    memory_budget_bytes: int | None = None,
) -> tuple[BenchmarkResult, TFLiteModel]:
    """Load ``model_path`` and time it on ``sample``; returns the result and the loaded model."""
    model, init_ms = load_model(model_path, threads=threads, runtime=runtime, memory_budget_bytes=memory_budget_bytes)
    try:
        return benchmark_loaded(model, sample, init_ms=init_ms, threads=threads, settings=settings), model
    except ModelError:
        model.close()
        raise


def benchmark_loaded(
    model: BenchmarkedModel, sample: Any, *, init_ms: float, threads: int,
    settings: BenchmarkSettings = BenchmarkSettings(), clock: Clock = time.perf_counter,
) -> BenchmarkResult:
    """Time a loaded model on ``sample``, alone. Raises ModelError when it cannot run on it."""
    try:
        warm = _warm_up(model, sample, settings, clock)
        times: list[float] = []
        timed_start = clock()
        while len(times) < settings.min_runs or clock() - timed_start < settings.min_seconds:
            times.append(_timed_run(model, warm.tensor, clock))
            if clock() - timed_start > settings.max_seconds and len(times) >= 2:
                break
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"benchmark failed: {exc}") from exc
    return summarize_runs(model, times, threads=threads, init_ms=init_ms, first_ms=warm.first_ms,
                          warmup_runs=warm.warmup_runs, peak_rss=peak_rss_bytes())


def benchmark_pair(
    first: BenchmarkedModel,
    second: BenchmarkedModel,
    sample: Any,
    *,
    init_ms: tuple[float, float],
    threads: int,
    settings: BenchmarkSettings = BenchmarkSettings(),
    clock: Clock = time.perf_counter,
) -> tuple[BenchmarkResult, BenchmarkResult]:
    """Time two loaded models on ``sample`` interleaved, in alternating blocks (see the module docstring).

    Each model first has its own first run and warm-up. The timed phase goes on until each model has
    ``settings.min_runs`` runs and its own runs add up to ``settings.min_seconds`` (so each is timed as
    long as ``benchmark_loaded`` would time it alone, and the phase takes about twice that), or, once
    each has two runs, until the phase has lasted ``settings.max_seconds``. Both results carry the
    process's peak memory with both models loaded, not either one's own. Raises ModelError when either
    cannot run on ``sample``.
    """
    models = (first, second)
    try:
        warm = tuple(_warm_up(model, sample, settings, clock) for model in models)
        blocks = tuple(block_runs(w.warm_ms) for w in warm)
        times: tuple[list[float], list[float]] = ([], [])
        timed_ms = [0.0, 0.0]

        def done(side: int) -> bool:
            return len(times[side]) >= settings.min_runs and timed_ms[side] >= settings.min_seconds * 1000

        phase_start = clock()
        while not (done(0) and done(1)):
            for side, model in enumerate(models):
                for _ in range(blocks[side]):
                    times[side].append(_timed_run(model, warm[side].tensor, clock))
                    timed_ms[side] += times[side][-1]
            if clock() - phase_start > settings.max_seconds and min(len(t) for t in times) >= 2:
                break
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"benchmark failed: {exc}") from exc
    peak = peak_rss_bytes()
    first_result, second_result = (
        summarize_runs(model, times[side], threads=threads, init_ms=init_ms[side], first_ms=warm[side].first_ms,
                       warmup_runs=warm[side].warmup_runs, peak_rss=peak)
        for side, model in enumerate(models)
    )
    return first_result, second_result


def block_runs(warm_ms: float) -> int:
    """How many runs of a model make one interleaved block: about BLOCK_SECONDS of its warm runs,
    at least one, at most MAX_BLOCK_RUNS."""
    if warm_ms <= 0:  # a clock too coarse to time one run
        return MAX_BLOCK_RUNS
    return max(1, min(MAX_BLOCK_RUNS, round(BLOCK_SECONDS * 1000 / warm_ms)))


def _warm_up(model: BenchmarkedModel, sample: Any, settings: BenchmarkSettings, clock: Clock) -> _Warm:
    tensor = model.prepare(sample)
    first_ms = _timed_run(model, tensor, clock)
    warmup_runs, warm_start = 0, clock()
    while warmup_runs < settings.warmup_runs or clock() - warm_start < settings.warmup_seconds:
        model.run_prepared(tensor)
        warmup_runs += 1
    warm_ms = (clock() - warm_start) * 1000 / warmup_runs if warmup_runs else first_ms
    return _Warm(tensor, first_ms, warmup_runs, warm_ms)


def _timed_run(model: BenchmarkedModel, tensor: Any, clock: Clock) -> float:
    """One run of ``model``, in milliseconds."""
    start = clock()
    model.run_prepared(tensor)
    return (clock() - start) * 1000
