"""A small load generator for agents' local inference endpoints: the demo's traffic, reusable by tests and benches.

::

    from server.load_generator import LoadGenerator, Target, load_samples

    generator = LoadGenerator([Target("cam-1", Path("agents/cam-1/serve.json"))], load_samples("eval.npz"),
                              rate_per_s=20.0)
    generator.start()
    ...
    generator.stop()
    generator.counts()["cam-1"].ok

One thread per target. Each thread finds its endpoint in the agent's
``DATA_DIR/serve.json`` (``{"url": "http://HOST:PORT"}`` or
``{"unix": "/path"}``, what the agent writes when its endpoint is up), sends
one sample per ``POST /v1/infer`` as JSON at a steady ``rate_per_s``, cycling
through the samples, over one kept-alive connection, and counts what
happened. When the endpoint is not there (the agent not started yet,
restarting, or on a new port after a restart), the thread counts the failed
attempt, waits ``retry_s``, reads ``serve.json`` again and carries on; an
error answer (e.g. 503 before a model is committed) is counted and the next
call reconnects, through ``serve.json`` too. It stops only when told to.

Calls go through ``shared.inference_client.InferenceClient``, the client
applications on the device use (the server never imports ``agent/``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from shared.errors import EndpointUnreachableError, InferenceError
from shared.inference_client import InferenceClient


@dataclass(frozen=True)
class Target:
    """One agent's endpoint, found through the ``serve.json`` in its data directory."""

    name: str
    serve_file: Path


@dataclass
class TargetCounts:
    """What one target's thread did. ``ok + failed`` calls reached the endpoint; ``unreachable`` attempts did not."""

    ok: int = 0
    failed: int = 0  # the endpoint answered with an error status (e.g. 503 while no model is committed)
    unreachable: int = 0  # no serve.json, nothing listening, or the connection broke
    versions: dict[int, int] = field(default_factory=dict)  # model version -> calls it answered
    last_error: str = ""

    @property
    def errors(self) -> int:
        return self.failed + self.unreachable

    @property
    def attempts(self) -> int:
        return self.ok + self.errors


def load_samples(eval_path: str | Path) -> np.ndarray:
    """The inputs (``x``) of an evaluation ``.npz`` as float32, first dimension the samples."""
    with np.load(eval_path, allow_pickle=False) as data:
        samples = np.asarray(data["x"], dtype=np.float32)
    if samples.ndim < 2 or len(samples) == 0:
        raise ValueError(f"{eval_path}: x must hold at least one sample, got shape {samples.shape}")
    return samples


class _Worker:
    def __init__(self, target: Target, samples: np.ndarray, generator: LoadGenerator) -> None:
        self.target, self.samples, self.generator = target, samples, generator
        self.counts = TargetCounts()
        self.client: InferenceClient | None = None
        self.thread = threading.Thread(target=self.run, name=f"load-{target.name}", daemon=True)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def call(self, sample: np.ndarray) -> None:
        """One call; counts it. A missing endpoint or a broken connection is 'unreachable', and an error answer
        'failed'; either way the client is dropped, so the next call reads serve.json again (a restarted agent
        may listen on a new port)."""
        g = self.generator
        try:
            if self.client is None:
                self.client = InferenceClient.from_serve_file(str(self.target.serve_file), timeout=g.timeout_s)
            result = self.client.infer(sample[np.newaxis, ...])
        except EndpointUnreachableError as exc:
            self.close()
            with g.lock:
                self.counts.unreachable += 1
                self.counts.last_error = str(exc)
            g.sleep(g.retry_s)
            return
        except InferenceError as exc:  # the endpoint answered with an error status (e.g. 503 before a model)
            self.close()
            with g.lock:
                self.counts.failed += 1
                self.counts.last_error = str(exc)
            return
        with g.lock:
            self.counts.ok += 1
            self.counts.versions[result.version] = self.counts.versions.get(result.version, 0) + 1

    def run(self) -> None:
        g = self.generator
        interval = 1.0 / g.rate_per_s
        next_at = g.monotonic()
        i = 0
        try:
            while not g.stopping.is_set():
                self.call(self.samples[i % len(self.samples)])
                i += 1
                next_at = max(next_at + interval, g.monotonic())  # after a stall: on at the rate, no burst
                delay = next_at - g.monotonic()
                if delay > 0:
                    g.sleep(delay)
        finally:
            self.close()


class LoadGenerator:
    """Calls each target's endpoint at ``rate_per_s`` from its own thread until ``stop``."""

    def __init__(self, targets: Sequence[Target], samples: np.ndarray, *, rate_per_s: float = 20.0,
                 timeout_s: float = 5.0, retry_s: float = 0.5,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"the rate must be more than zero calls per second, got {rate_per_s:g}")
        if len(samples) == 0:
            raise ValueError("no samples to send")
        self.rate_per_s, self.timeout_s, self.retry_s, self.monotonic = rate_per_s, timeout_s, retry_s, monotonic
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.workers = [_Worker(t, np.asarray(samples, dtype=np.float32), self) for t in targets]

    def sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)  # wakes at once on stop

    def start(self) -> Self:
        for worker in self.workers:
            worker.thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stopping.set()
        for worker in self.workers:
            if worker.thread.is_alive():
                worker.thread.join(timeout_s)

    def counts(self) -> dict[str, TargetCounts]:
        """A consistent copy of every target's counts, by target name."""
        with self.lock:
            return {w.target.name: TargetCounts(w.counts.ok, w.counts.failed, w.counts.unreachable,
                                                dict(w.counts.versions), w.counts.last_error)
                    for w in self.workers}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(counts: dict[str, TargetCounts]) -> list[str]:
    """One line per target: calls answered, errors, the versions that answered."""
    lines = []
    for name, c in counts.items():
        versions = ", ".join(f"v{v}: {n}" for v, n in sorted(c.versions.items())) or "none"
        line = f"{name}: {c.ok} calls answered ({versions}), {c.failed} error answers, {c.unreachable} unreachable"
        lines.append(line + (f" (last: {c.last_error})" if c.errors else ""))
    return lines
