"""The trial's child process (``python -m shared.trial_child``), started by ``shared.trial``.

It reads a TrialRequest on stdin, caps its own memory, measures the candidate
alone and prints that result, then, with a replaced model to compare with,
measures the two interleaved (or the replaced one alone when both do not fit
at once) and prints the final result; ``shared/trial.py`` says why, and what
the numbers mean.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from shared.codec import decode, encode
from shared.messages import BenchmarkResult
from shared.trial import PREVIOUS_NOT_MEASURED, MiB, TrialRequest, TrialResult

if TYPE_CHECKING:
    from shared.benchmark import BenchmarkSettings


def _process_memory() -> tuple[int, int]:
    """This process's address space and resident memory in bytes (VmSize, VmRSS)."""
    sizes = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmSize", "VmRSS"):
                sizes[key] = int(value.split()[0]) * 1024
    return sizes["VmSize"], sizes["VmRSS"]


def _limit_memory(limit_bytes: int) -> int:
    """Cap this process at ``limit_bytes`` of resident memory in all; returns what the model may use.

    RLIMIT_AS counts address space, which the runtime already holds far more of than it
    uses, so the cap is today's address space plus what the limit leaves beyond today's RSS.
    """
    try:
        size, rss = _process_memory()
    except (OSError, KeyError, ValueError):  # not Linux: the plain address-space cap
        size, rss = 0, 0
    budget = limit_bytes - rss
    if budget > 0:
        resource.setrlimit(resource.RLIMIT_AS, (size + budget, size + budget))
    return budget


def _die_with_parent() -> None:
    """A trial orphaned by a killed agent must not run on beside its restarted successor."""
    parent = os.environ.get("EDGEFLEET_TRIAL_PARENT")
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and str(os.getppid()) != parent:
        os._exit(1)  # the parent died before prctl took effect


def _settings(request: TrialRequest) -> BenchmarkSettings:
    from shared.benchmark import BenchmarkSettings

    return BenchmarkSettings(
        warmup_runs=request.warmup_runs,
        warmup_seconds=request.warmup_seconds,
        min_runs=request.min_runs,
        min_seconds=request.min_seconds,
    )


@dataclass(frozen=True)
class _Measured:
    benchmark: BenchmarkResult
    predicted: list[int]
    ops: tuple[str, ...]
    delegate_partitions: int


def _measure(path: str, x: Any, request: TrialRequest, budget_bytes: int) -> _Measured:
    """Benchmark the model at ``path`` on the first sample and predict every sample; the interpreter is
    released before this returns. Raises EdgefleetError (or MemoryError)."""
    from shared.benchmark import benchmark_model
    from shared.interpreter import predict_classes

    benchmark, model = benchmark_model(
        path, x[:1], threads=request.threads, settings=_settings(request), runtime=request.runtime or None,
        memory_budget_bytes=budget_bytes,
    )
    try:
        predicted = predict_classes(model, x)
        ops, partitions = model.graph_ops()
    finally:
        model.close()
    return _Measured(benchmark, predicted, ops, partitions)


@dataclass(frozen=True)
class _Paired:
    candidate: BenchmarkResult
    previous: BenchmarkResult
    previous_predicted: list[int]


def _measure_pair(x: Any, request: TrialRequest, budget_bytes: int) -> _Paired:
    """Load the candidate and the replaced model both, time them interleaved on the first sample and
    predict every sample with the replaced model; both interpreters are released before this returns.
    Raises OutOfMemoryError, ModelLoadError or MemoryError when the two do not fit at once, another
    EdgefleetError when the replaced model cannot run on the samples."""
    from shared.benchmark import benchmark_pair, load_model
    from shared.interpreter import TFLiteModel, predict_classes

    assert request.previous_model_path is not None
    models: list[TFLiteModel] = []
    init_ms: list[float] = []
    try:
        for path in (request.model_path, request.previous_model_path):
            model, loaded_ms = load_model(path, threads=request.threads, runtime=request.runtime or None,
                                          memory_budget_bytes=_address_space_left(budget_bytes))
            models.append(model)
            init_ms.append(loaded_ms)
        candidate, previous = benchmark_pair(
            models[0], models[1], x[:1], init_ms=(init_ms[0], init_ms[1]), threads=request.threads,
            settings=_settings(request),
        )
        return _Paired(candidate, previous, predict_classes(models[1], x))
    finally:
        for model in models:
            model.close()


def _address_space_left(budget_bytes: int) -> int:
    """What this process may still allocate under the cap ``_limit_memory`` set (``budget_bytes`` when
    there is none, or it cannot be read): a second model loaded beside a first is refused up front
    when its largest tensor cannot fit in what the first left."""
    try:
        cap = resource.getrlimit(resource.RLIMIT_AS)[0]
        size, _ = _process_memory()
    except (OSError, KeyError, ValueError):
        return budget_bytes
    if cap == resource.RLIM_INFINITY:
        return budget_bytes
    return min(budget_bytes, max(cap - size, 0))


def _child(request: TrialRequest, budget_bytes: int, emit: Callable[[TrialResult], None]) -> TrialResult:
    """The candidate's trial, then the comparison with the replaced model when asked for; ``emit`` prints
    the candidate's result before the replaced model runs (``shared/trial.py`` says why)."""
    import numpy as np

    from shared.errors import EdgefleetError, ModelLoadError, OutOfMemoryError
    from shared.interpreter import top1_accuracy

    if budget_bytes <= 0:
        return TrialResult(ok=False, oom=True, error=f"the runtime alone uses more than the trial's limit of "
                           f"{request.memory_limit_mb} MiB")
    try:
        with np.load(request.eval_path, allow_pickle=False) as data:
            x, y = data["x"].astype(np.float32), data["y"]
    except MemoryError:
        return TrialResult(ok=False, oom=True, error=f"the eval set does not fit in {budget_bytes // MiB} MiB")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return TrialResult(ok=False, error=f"eval set unreadable: {exc}")
    if len(x) == 0 or len(x) != len(y):
        return TrialResult(ok=False, error=f"eval set has {len(x)} inputs and {len(y)} labels")
    try:
        candidate = _measure(request.model_path, x, request, budget_bytes)
    except OutOfMemoryError as exc:
        return TrialResult(ok=False, error=str(exc), oom=True)
    except ModelLoadError as exc:
        return TrialResult(ok=False, error=str(exc), load_error=True)
    except EdgefleetError as exc:
        return TrialResult(ok=False, error=str(exc))
    except MemoryError:
        return TrialResult(ok=False, oom=True, error=f"the model ran out of its {budget_bytes // MiB} MiB")
    result = TrialResult(
        ok=True,
        benchmark=candidate.benchmark,
        accuracy=round(top1_accuracy(candidate.predicted, y), 6),
        samples=len(x),
        ops=candidate.ops,
        delegate_partitions=candidate.delegate_partitions,
        predictions=tuple(candidate.predicted) if request.with_predictions else (),
    )
    if request.previous_model_path is None:
        return result
    emit(replace(result, previous_error=PREVIOUS_NOT_MEASURED))
    return _compare(result, x, y, request, budget_bytes)


def _compare(result: TrialResult, x: Any, y: Any, request: TrialRequest, budget_bytes: int) -> TrialResult:
    """``result`` (the candidate's, measured alone) with the replaced model's numbers: both timed
    interleaved when they fit in memory at once, else the replaced model alone after the candidate."""
    from shared.benchmark import reset_peak_rss, with_timed_runs
    from shared.errors import EdgefleetError, ModelLoadError, OutOfMemoryError
    from shared.interpreter import top1_accuracy

    assert result.benchmark is not None
    gc.collect()  # _measure closed the candidate's interpreter: its arena goes before the pair loads
    reset_peak_rss()
    try:
        paired: _Paired | None = _measure_pair(x, request, budget_bytes)
    except (OutOfMemoryError, ModelLoadError, MemoryError):
        # Not both at once. A load error too: under the cap a failed allocation does not always say so,
        # and the replaced model alone says whether it loads at all.
        paired = None
    except EdgefleetError as exc:
        return replace(result, previous_error=str(exc))
    if paired is None:
        return _compare_alone(result, x, y, request, budget_bytes)
    return replace(
        result,
        benchmark=with_timed_runs(result.benchmark, paired.candidate),
        previous_benchmark=paired.previous,
        previous_accuracy=round(top1_accuracy(paired.previous_predicted, y), 6),
        paired=True,
    )


def _compare_alone(result: TrialResult, x: Any, y: Any, request: TrialRequest, budget_bytes: int) -> TrialResult:
    """``result`` with the replaced model's numbers, that model measured alone with the same limit."""
    from shared.benchmark import reset_peak_rss
    from shared.errors import EdgefleetError
    from shared.interpreter import top1_accuracy

    assert request.previous_model_path is not None
    gc.collect()  # whatever the failed pair had loaded goes first
    reset_peak_rss()
    try:
        previous = _measure(request.previous_model_path, x, request, budget_bytes)
    except EdgefleetError as exc:
        return replace(result, previous_error=str(exc))
    except MemoryError:
        return replace(result, previous_error=f"the replaced model ran out of the trial's {budget_bytes // MiB} MiB")
    return replace(
        result,
        previous_benchmark=previous.benchmark,
        previous_accuracy=round(top1_accuracy(previous.predicted, y), 6),
    )


def _emit(result: TrialResult) -> None:
    sys.stdout.write(json.dumps(encode(result)) + "\n")
    sys.stdout.flush()


def main() -> None:
    _die_with_parent()
    raw = sys.stdin.buffer.read()
    request = decode(TrialRequest, json.loads(raw))
    # The runtime is imported before the limit is measured, so its own footprint is not the model's.
    import numpy  # noqa: F401

    from shared.errors import EdgefleetError
    from shared.interpreter import runtime_info

    try:
        runtime_info(request.runtime or None)
    except EdgefleetError:
        pass  # the load below reports a missing runtime properly
    budget = _limit_memory(request.memory_limit_mb * MiB)
    _emit(_child(request, budget, _emit))


if __name__ == "__main__":
    main()
