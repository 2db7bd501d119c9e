"""Run a staged model's trial in a child process with a time and memory limit.

A crafted or broken model can crash or hang the interpreter, or ask for more
memory than the device has; it must never take the agent down. The parent
hands the child (``python -m shared.trial``) a JSON request on stdin; the
child loads the model, benchmarks it benchmark_model style, measures accuracy
on the eval set that travelled with it, and prints one JSON result line.

``start_trial`` returns at once with a ``TrialProcess`` to poll, so the
agent's loop keeps answering the broker while a trial runs; ``run_trial``
waits for it (the server's host evaluation). Output goes to temporary files,
not pipes, so a chatty child can never block on a full pipe.

The memory limit covers the whole child process. The child measures what the
runtime itself takes once imported, limits its address space to that plus
what is left of the limit, and refuses up front a model whose largest tensor
alone would not fit: such a model reports ``oom`` with the numbers instead of
meeting the kernel's out-of-memory killer, which might pick the agent.

With ``previous_model_path`` the child also measures the model the candidate
would replace, after the candidate and with its interpreter released: same
settings, threads, runtime and memory limit, on the same eval samples, so the
device can compare the two (``agent/gates.py``). The candidate's result stands
whatever happens to that second measurement: the child prints the candidate's
result first, so even a crash or a timeout while the replaced model runs only
leaves ``previous_error`` saying why there is nothing to compare with.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import IO, Any, Protocol

from shared.codec import decode, encode
from shared.errors import ProtocolError
from shared.messages import BenchmarkResult

MiB = 1024 * 1024


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
    memory_limit_mb: int = 4096  # the whole trial process, runtime included
    with_predictions: bool = False  # the host evaluation compares them with the float model's
    previous_model_path: str | None = None  # the model the candidate would replace: measured after it


LOAD_ERROR = "load_error: "  # how a trial's reason starts when the interpreter cannot load the model
OOM = "oom: "  # ... and when the model needs more memory than the trial may use


@dataclass(frozen=True)
class TrialResult:
    ok: bool
    error: str = ""
    load_error: bool = False
    oom: bool = False
    benchmark: BenchmarkResult | None = None
    accuracy: float | None = None
    samples: int | None = None
    ops: tuple[str, ...] = ()
    delegate_partitions: int = 0
    predictions: tuple[int, ...] = ()
    # The replaced model (``previous_model_path``), measured the same way; when it could not be,
    # both numbers are None and previous_error says why.
    previous_benchmark: BenchmarkResult | None = None
    previous_accuracy: float | None = None
    previous_error: str = ""

    @property
    def reason(self) -> str:
        """The error, prefixed with OOM or LOAD_ERROR when the model could not be loaded at all."""
        prefix = OOM if self.oom else LOAD_ERROR if self.load_error else ""
        return prefix + self.error


class TrialHandle(Protocol):
    """A trial under way: ``poll`` returns None until it ended, then its result."""

    def poll(self) -> TrialResult | None: ...

    def cancel(self) -> None: ...


# The candidate's result as the child prints it before it measures the replaced model: a child that
# dies or runs out of time after that line still has a result, without the comparison.
PREVIOUS_NOT_MEASURED = "the trial ended before the replaced model was measured"

# What a child that ran out of memory leaves on stderr (C++, Python, libc).
_OOM_MARKS = ("std::bad_alloc", "MemoryError", "Cannot allocate memory", "out of memory")


class TrialProcess:
    """One trial child. Every failure comes back from ``poll`` as a TrialResult, never an exception."""

    def __init__(
        self,
        request: TrialRequest,
        *,
        timeout: float,
        python: str = sys.executable,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self.monotonic = monotonic
        self._result: TrialResult | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._deadline = monotonic() + timeout
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MiB of address space per thread arena otherwise
            "EDGEFLEET_TRIAL_PARENT": str(os.getpid()),
        }
        try:
            # They outlive this call (the child writes to them until it ends); _finish closes them.
            self._stdout = tempfile.TemporaryFile()  # noqa: SIM115
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
            with tempfile.TemporaryFile() as stdin:
                stdin.write(json.dumps(asdict(request)).encode())
                stdin.seek(0)
                self._proc = subprocess.Popen(
                    [python, "-m", "shared.trial"], stdin=stdin, stdout=self._stdout, stderr=self._stderr, env=env
                )
        except OSError as exc:  # no fork, no temporary files (a full /tmp): the trial fails, the agent goes on
            self._finish(TrialResult(ok=False, error=f"cannot start the trial process: {exc}"))

    def poll(self) -> TrialResult | None:
        if self._result is not None or self._proc is None:
            return self._result
        code = self._proc.poll()
        if code is None:
            if self.monotonic() < self._deadline:
                return None
            self._kill()
            return self._finish(self._salvage(TrialResult(ok=False, error=f"trial timed out after {self.timeout:g} s")))
        return self._finish(self._read_result(code))

    def wait(self, interval: float = 0.05) -> TrialResult:
        while (result := self.poll()) is None:
            time.sleep(interval)
        return result

    def cancel(self) -> None:
        if self._result is None:
            self._kill()
            self._finish(TrialResult(ok=False, error="trial cancelled"))

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _finish(self, result: TrialResult) -> TrialResult:
        self._result = result
        for output in (self._stdout, self._stderr):
            if output is not None:
                output.close()
        return result

    def _lines(self) -> list[str]:
        assert self._stdout is not None
        self._stdout.seek(0)
        return self._stdout.read().decode(errors="replace").strip().splitlines()

    def _salvage(self, failure: TrialResult) -> TrialResult:
        """A child that failed after it printed the candidate's result (while the replaced model ran):
        that result, with the failure as the reason the comparison is missing."""
        for line in reversed(self._lines()):
            try:
                provisional = decode(TrialResult, json.loads(line))
            except (json.JSONDecodeError, ProtocolError):
                continue
            if provisional.ok and provisional.previous_error == PREVIOUS_NOT_MEASURED:
                return replace(provisional, previous_error=f"{PREVIOUS_NOT_MEASURED}: {failure.reason}")
        return failure

    def _read_result(self, code: int) -> TrialResult:
        assert self._stdout is not None and self._stderr is not None
        lines = self._lines()
        if code == 0 and lines:
            try:
                return decode(TrialResult, json.loads(lines[-1]))
            except (json.JSONDecodeError, ProtocolError) as exc:
                return TrialResult(ok=False, error=f"trial process sent an unreadable result: {exc}")
        return self._salvage(self._crash_result(code))

    def _crash_result(self, code: int) -> TrialResult:
        assert self._stderr is not None
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        if code == -signal.SIGKILL:  # not our timeout: the kernel's out-of-memory killer is the usual sender
            return TrialResult(ok=False, oom=True, error=f"the trial process was killed (SIGKILL), most likely out "
                               f"of memory: {tail}".rstrip(": "))
        if any(mark in stderr for mark in _OOM_MARKS):
            return TrialResult(ok=False, oom=True, error=f"the trial process ran out of memory: {tail}")
        return TrialResult(ok=False, error=f"trial process died with exit code {code}: {tail}")


def start_trial(request: TrialRequest, *, timeout: float, python: str = sys.executable) -> TrialProcess:
    """Start the trial in a child (``python``: this interpreter unless told otherwise, e.g. a venv
    with another TFLite runtime) and return at once."""
    return TrialProcess(request, timeout=timeout, python=python)


def run_trial(request: TrialRequest, *, timeout: float, python: str = sys.executable) -> TrialResult:
    """Run the trial in a child and wait for its result."""
    return start_trial(request, timeout=timeout, python=python).wait()


# -- the child -------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Measured:
    benchmark: BenchmarkResult
    predicted: list[int]
    ops: tuple[str, ...]
    delegate_partitions: int


def _measure(path: str, x: Any, request: TrialRequest, budget_bytes: int) -> _Measured:
    """Benchmark the model at ``path`` on the first sample and predict every sample; the interpreter is
    released before this returns. Raises EdgefleetError (or MemoryError)."""
    from shared.benchmark import BenchmarkSettings, benchmark_model
    from shared.interpreter import predict_classes

    settings = BenchmarkSettings(
        warmup_runs=request.warmup_runs,
        warmup_seconds=request.warmup_seconds,
        min_runs=request.min_runs,
        min_seconds=request.min_seconds,
    )
    benchmark, model = benchmark_model(
        path, x[:1], threads=request.threads, settings=settings, runtime=request.runtime or None,
        memory_budget_bytes=budget_bytes,
    )
    try:
        predicted = predict_classes(model, x)
        ops, partitions = model.graph_ops()
    finally:
        model.close()
    return _Measured(benchmark, predicted, ops, partitions)


def _child(request: TrialRequest, budget_bytes: int, emit: Callable[[TrialResult], None]) -> TrialResult:
    """The candidate's trial, then the replaced model's when asked for; ``emit`` prints the candidate's
    result before the replaced model runs (see the module docstring)."""
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
    gc.collect()  # _measure closed the candidate's interpreter: its arena goes before the replaced model loads
    emit(replace(result, previous_error=PREVIOUS_NOT_MEASURED))
    from shared.benchmark import reset_peak_rss

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
