"""With no traffic for a while, run the served model on its eval samples so the latency series stays alive.

The runs go through the model host like any call (the same lock, the same
swap rules) and into the recorder as source "rebenchmark", so the server can
tell them from an application's calls. They run on a thread of their own,
never on the agent's loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.serving.host import ModelHost
from agent.serving.recorder import REBENCHMARK, LatencyRecorder
from shared.errors import EdgefleetError

logger = logging.getLogger(__name__)

RUNS = 32  # invokes per re-benchmark: a few dozen, one eval sample each (cycling)


class Rebenchmark:
    def __init__(self, host: ModelHost, recorder: LatencyRecorder, *, interval_s: float, runs: int = RUNS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.recorder = recorder
        self.interval_s = interval_s
        self.runs = runs
        self.monotonic = monotonic
        self._last = monotonic()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tick(self) -> None:
        """Start a re-benchmark when it is on, a model is served, and nothing called it for interval_s."""
        if self.interval_s <= 0 or self.running or self.host.current is None:
            return
        now = self.monotonic()
        if now - max(self._last, self.recorder.last_traffic) < self.interval_s:
            return
        self._last = now
        self._thread = threading.Thread(target=self.run_once, name="rebenchmark", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def run_once(self) -> int:
        """Run ``runs`` invokes of the eval samples; returns how many were recorded."""
        import numpy as np

        served = self.host.current
        if served is None:
            return 0
        try:
            with np.load(served.source.eval_path, allow_pickle=False) as data:
                x = np.asarray(data["x"][: self.runs], dtype=np.float32)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            logger.warning("cannot re-benchmark %s: its eval samples are unreadable: %s", served.source.label, exc)
            return 0
        if len(x) == 0 or tuple(x.shape[1:]) != served.sample_shape:
            logger.warning("cannot re-benchmark %s: its eval samples are shaped %s, the model takes %s",
                           served.source.label, list(x.shape[1:]), list(served.sample_shape))
            return 0
        done = 0
        clock = time.perf_counter
        for i in range(self.runs):
            start = clock()
            try:
                answered, _, invoke_ms = self.host.run(x[i % len(x)][np.newaxis, ...])
            except EdgefleetError as exc:
                logger.warning("re-benchmark stopped: %s", exc)
                break
            description = answered.model.description
            self.recorder.record(answered.source, description.runtime.name, description.threads,
                                 invoke_ms=invoke_ms, e2e_ms=(clock() - start) * 1000.0, samples=1,
                                 origin=REBENCHMARK)
            done += 1
        logger.debug("re-benchmarked %s: %d runs", served.source.label, done)
        return done
