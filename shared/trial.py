"""Run a staged model's trial in a child process with a time and memory limit.

A crafted or broken model can crash or hang the interpreter, or ask for more
memory than the device has; it must never take the agent down. The parent
hands the child (``python -m shared.trial_child``) a JSON request on stdin; the
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
would replace, so the device can compare the two (``agent/gates.py``): same
settings, threads, runtime and memory limit, on the same eval samples. The
candidate is measured alone first, and its result stands whatever happens to
the comparison: the child prints that result first, so even a crash or a
timeout while the replaced model runs only leaves ``previous_error`` saying
why there is nothing to compare with. Then, with the candidate released, the
child loads the candidate again and the replaced model beside it and times
them interleaved (``shared.benchmark.benchmark_pair``), so load from
elsewhere on the device (other processes, the agent serving traffic) falls
on both alike and the latency ratio the gates read stays fair. The result's
``benchmark`` then carries the candidate's interleaved runs with its own load
time, first run and peak memory from the solo measurement (the memory gate's
number: what the candidate needs alone), and ``previous_benchmark`` the
replaced model's interleaved numbers, whose ``peak_rss_bytes`` is the
process's peak with both models loaded; ``paired`` says so. When the two do
not fit in the memory limit at once, the replaced model is measured alone
after the candidate, as before, and ``paired`` is False.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import IO, Protocol

from shared.codec import decode
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
    previous_model_path: str | None = None  # the model the candidate would replace: compared with it


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
    # The two latencies were timed interleaved (see the module docstring); False when the two models
    # did not fit in the memory limit at once and the replaced one ran alone, after the candidate.
    paired: bool = False

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
                    [python, "-m", "shared.trial_child"], stdin=stdin, stdout=self._stdout, stderr=self._stderr, env=env
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
