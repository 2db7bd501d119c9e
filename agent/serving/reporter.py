"""One ServingReport per model version and interval, through the agent's outbox.

``tick()`` (from the agent's loop) closes an interval every
``interval_s`` seconds: it swaps the recorder's accumulators out and sends
one report per version (and source) that had calls. The outbox keeps each
report until the server acknowledges it. While more than ``max_backlog``
serving reports wait for that acknowledgement (a long outage, a server that
is down), further intervals are merged into one pending accumulator per
version instead of adding entries (histograms merge exactly), and sent once
the backlog has drained; ``flush()`` on a clean stop sends whatever is
pending, backlog or not. So every call lands in exactly one report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.serving.recorder import Accumulator, Key
from agent.serving.system import SystemSampler
from shared.messages import ServingReport, SystemStats

logger = logging.getLogger(__name__)

MAX_BACKLOG = 60  # unacknowledged serving reports in the outbox beyond which intervals are merged

SendReport = Callable[[ServingReport, str], None]  # the report and the deployment that installed its model


def serving_report(acc: Accumulator, system: SystemStats | None) -> ServingReport:
    return ServingReport(
        model=acc.source.model, version=acc.source.version, sha256=acc.source.sha256,
        quantization=acc.source.quantization, runtime=acc.runtime, threads=acc.threads, source=acc.origin,
        start=acc.start, end=acc.end, calls=acc.calls, errors=acc.errors, samples=acc.samples,
        invoke=acc.invoke.to_wire(), e2e=acc.e2e.to_wire(),
        p50_ms=acc.invoke.percentile(50), p90_ms=acc.invoke.percentile(90), p99_ms=acc.invoke.percentile(99),
        system=system,
    )


class ServingReporter:
    def __init__(
        self,
        swap: Callable[[], list[Accumulator]],
        send: SendReport,
        backlog: Callable[[], int],
        *,
        interval_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        system: SystemSampler | None = None,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.swap = swap
        self.send = send
        self.backlog = backlog
        self.interval_s = interval_s
        self.monotonic = monotonic
        self.system = system
        self.max_backlog = max_backlog
        self._next = monotonic() + interval_s
        self._pending: dict[Key, Accumulator] = {}
        self._holding = False

    @property
    def pending_calls(self) -> int:
        return sum(acc.calls for acc in self._pending.values())

    def tick(self) -> None:
        now = self.monotonic()
        if now < self._next:
            return
        self._next = max(self._next + self.interval_s, now)  # a late tick does not bunch intervals up
        self._close_interval(final=False)

    def flush(self) -> None:
        """The agent stops: send everything recorded, whatever the backlog (the outbox keeps it on disk)."""
        self._close_interval(final=True)

    def _close_interval(self, *, final: bool) -> None:
        for acc in self.swap():
            held = self._pending.get(acc.key)
            if held is None:
                self._pending[acc.key] = acc
            else:
                held.merge(acc)
        if not self._pending:
            return
        waiting = self.backlog()
        if not final and waiting > self.max_backlog:
            if not self._holding:
                logger.warning("%d serving reports wait for the server's acknowledgement: merging further "
                               "intervals into one report until they are through", waiting)
            self._holding = True
            return
        if self._holding:
            logger.info("the serving report backlog drained: sending %d merged calls", self.pending_calls)
            self._holding = False
        system = self.system.sample() if self.system is not None else None
        pending, self._pending = self._pending, {}
        for acc in pending.values():
            self.send(serving_report(acc, system), acc.source.deployment_id)
