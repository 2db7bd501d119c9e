"""Measure a TFLite variant on the host the way an agent measures it on a device.

Same interpreter (ai-edge-litert), same adapter (``shared.interpreter``) and
same benchmark (``shared.benchmark``) as the agents, so host and device
numbers differ by the hardware only. No TensorFlow here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from server.compress.evalset import EvalSet
from shared.benchmark import BenchmarkSettings, benchmark_model
from shared.errors import ModelError, UserInputError
from shared.interpreter import accuracy

HOST_RUNTIME = "ai-edge-litert"
HOST_BENCHMARK = BenchmarkSettings()


@dataclass(frozen=True)
class HostEvaluation:
    size_bytes: int
    accuracy: float
    p50_ms: float
    p95_ms: float
    runtime: str  # "<name> <version>", as in BenchmarkResult.runtime


def evaluate_variant(
    tflite_path: str | os.PathLike[str],
    evalset: EvalSet,
    *,
    threads: int = 1,
    settings: BenchmarkSettings = HOST_BENCHMARK,
) -> HostEvaluation:
    """Benchmark ``tflite_path`` on the first evaluation sample, then score it on all of ``evalset``."""
    path = Path(tflite_path)
    if not path.is_file():
        raise UserInputError(f"TFLite model not found: {path}")
    if len(evalset) == 0:
        raise UserInputError("cannot evaluate a model on an empty evaluation set")
    try:
        result, model = benchmark_model(
            os.fspath(path), evalset.x[:1], threads=threads, settings=settings, runtime=HOST_RUNTIME
        )
    except (ValueError, RuntimeError) as exc:
        # benchmark_model translates load errors itself, but not those of the timed invocations.
        raise ModelError(f"benchmarking {path.name} failed: {exc}") from exc
    try:
        top1 = accuracy(model, evalset.x, evalset.y)
    finally:
        model.close()
    return HostEvaluation(
        size_bytes=path.stat().st_size,
        accuracy=top1,
        p50_ms=result.p50_ms,
        p95_ms=result.p95_ms,
        runtime=result.runtime,
    )
