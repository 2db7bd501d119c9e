"""Run a staged model's trial in a child process with a time and memory limit.

A crafted or broken model can crash or hang the interpreter; it must never
take the agent down. The parent sends a JSON request on stdin, the child
(``python -m shared.trial``) loads the model, benchmarks it benchmark_model
style, measures accuracy on the eval set that travelled with it, and prints
one JSON result line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass

from shared.codec import decode, encode
from shared.errors import ProtocolError
from shared.messages import BenchmarkResult


@dataclass(frozen=True)
class TrialRequest:
    model_path: str
    eval_path: str
    threads: int
    runtime: str
    warmup_runs: int
    warmup_seconds: float
    min_runs: int
    min_seconds: float
    memory_limit_mb: int = 4096
    with_predictions: bool = False  # the host evaluation compares them with the float model's


LOAD_ERROR = "load_error: "  # how a trial's reason starts when the interpreter cannot load the model


@dataclass(frozen=True)
class TrialResult:
    ok: bool
    error: str = ""
    load_error: bool = False
    benchmark: BenchmarkResult | None = None
    accuracy: float | None = None
    samples: int | None = None
    ops: tuple[str, ...] = ()
    delegate_partitions: int = 0
    predictions: tuple[int, ...] = ()

    @property
    def reason(self) -> str:
        """The error, prefixed with LOAD_ERROR when the model could not be loaded at all."""
        return (LOAD_ERROR if self.load_error else "") + self.error


def run_trial(request: TrialRequest, *, timeout: float, python: str = sys.executable) -> TrialResult:
    """Run the trial in a child (``python``: this interpreter unless told otherwise, e.g. a venv
    with another TFLite runtime); every failure comes back as a TrialResult, never an exception."""
    try:
        proc = subprocess.run(
            [python, "-m", "shared.trial"],
            check=False,
            input=json.dumps(asdict(request)).encode(),
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    except subprocess.TimeoutExpired:
        return TrialResult(ok=False, error=f"trial timed out after {timeout:g} s")
    except OSError as exc:
        return TrialResult(ok=False, error=f"cannot start the trial process: {exc}")
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return TrialResult(ok=False, error=f"trial process died with exit code {proc.returncode}: {' | '.join(tail)}")
    try:
        return decode(TrialResult, json.loads(lines[-1]))
    except (json.JSONDecodeError, ProtocolError) as exc:
        return TrialResult(ok=False, error=f"trial process sent an unreadable result: {exc}")


def _child(request: TrialRequest) -> TrialResult:
    import numpy as np

    from shared.benchmark import BenchmarkSettings, benchmark_model
    from shared.errors import EdgefleetError, ModelLoadError
    from shared.interpreter import predict_classes, top1_accuracy

    try:
        with np.load(request.eval_path, allow_pickle=False) as data:
            x, y = data["x"].astype(np.float32), data["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return TrialResult(ok=False, error=f"eval set unreadable: {exc}")
    if len(x) == 0 or len(x) != len(y):
        return TrialResult(ok=False, error=f"eval set has {len(x)} inputs and {len(y)} labels")
    settings = BenchmarkSettings(
        warmup_runs=request.warmup_runs,
        warmup_seconds=request.warmup_seconds,
        min_runs=request.min_runs,
        min_seconds=request.min_seconds,
    )
    try:
        result, model = benchmark_model(
            request.model_path, x[:1], threads=request.threads, settings=settings, runtime=request.runtime or None
        )
    except ModelLoadError as exc:
        return TrialResult(ok=False, error=str(exc), load_error=True)
    except EdgefleetError as exc:
        return TrialResult(ok=False, error=str(exc))
    try:
        predicted = predict_classes(model, x)
    except EdgefleetError as exc:
        return TrialResult(ok=False, error=str(exc))
    ops, partitions = model.graph_ops()
    return TrialResult(
        ok=True,
        benchmark=result,
        accuracy=round(top1_accuracy(predicted, y), 6),
        samples=len(x),
        ops=ops,
        delegate_partitions=partitions,
        predictions=tuple(predicted) if request.with_predictions else (),
    )


def main() -> None:
    raw = sys.stdin.buffer.read()
    request = decode(TrialRequest, json.loads(raw))
    # The child limits itself (preexec_fn is unsafe with the agent's MQTT thread running).
    limit = request.memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = _child(request)
    sys.stdout.write(json.dumps(encode(result)) + "\n")


if __name__ == "__main__":
    main()
