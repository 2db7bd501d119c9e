"""Latency measurement the way TFLite's ``benchmark_model`` does it.

Init time, first inference, a warm-up phase, then at least ``min_runs`` runs
and at least ``min_seconds`` of timed runs; mean, std, min, max and
percentiles of those runs; peak resident memory of the process. The server
(host evaluation) and the agent (on-device trial) both call this.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

from shared.errors import ModelError
from shared.interpreter import TFLiteModel
from shared.messages import BenchmarkResult


@dataclass(frozen=True)
class BenchmarkSettings:
    warmup_runs: int = 1
    warmup_seconds: float = 0.5
    min_runs: int = 50
    min_seconds: float = 1.0
    max_seconds: float = 150.0


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
    clock = time.perf_counter
    start = clock()
    model = TFLiteModel(model_path, threads=threads, runtime=runtime, memory_budget_bytes=memory_budget_bytes)
    init_ms = (clock() - start) * 1000
    try:
        return _measure(model, sample, init_ms, threads, settings), model
    except (ValueError, RuntimeError) as exc:
        model.close()
        raise ModelError(f"benchmark failed: {exc}") from exc


def _measure(model: TFLiteModel, sample: Any, init_ms: float, threads: int, settings: BenchmarkSettings) -> BenchmarkResult:
    clock = time.perf_counter
    tensor = model.prepare(sample)

    start = clock()
    model.run_prepared(tensor)
    first_ms = (clock() - start) * 1000

    warmup_runs, warm_start = 0, clock()
    while warmup_runs < settings.warmup_runs or clock() - warm_start < settings.warmup_seconds:
        model.run_prepared(tensor)
        warmup_runs += 1

    times: list[float] = []
    timed_start = clock()
    while len(times) < settings.min_runs or clock() - timed_start < settings.min_seconds:
        t0 = clock()
        model.run_prepared(tensor)
        times.append((clock() - t0) * 1000)
        if clock() - timed_start > settings.max_seconds and len(times) >= 2:
            break

    ordered = sorted(times)
    mean = sum(times) / len(times)
    std = math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))
    return BenchmarkResult(
        runtime=f"{model.info.name} {model.info.version}",
        threads=threads,
        init_ms=round(init_ms, 4),
        first_ms=round(first_ms, 4),
        warmup_runs=warmup_runs,
        runs=len(times),
        mean_ms=round(mean, 4),
        std_ms=round(std, 4),
        min_ms=round(ordered[0], 4),
        max_ms=round(ordered[-1], 4),
        p50_ms=round(percentile(ordered, 50), 4),
        p90_ms=round(percentile(ordered, 90), 4),
        p95_ms=round(percentile(ordered, 95), 4),
        p99_ms=round(percentile(ordered, 99), 4),
        peak_rss_bytes=peak_rss_bytes(),
    )
