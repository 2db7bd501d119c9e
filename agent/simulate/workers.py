"""A simulated fleet split over several processes (``--processes K``), their summaries added up.

One process steps its devices on one thread, so past a few thousand devices
a second core helps. Each child runs its share of the configs with its own
network loop; the parent only waits, forwards the stop, and adds up what the
children report. Children ignore SIGINT (a Ctrl-C reaches the whole process
group) and stop when the parent sets the shared event, so every device still
disconnects cleanly.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.simulate.fleet import FleetSummary, SimulatedFleet, StopFlag, load_configs
from agent.simulate.network import DeviceName
from agent.simulate.runtime import SimulatedRuntime
from shared.errors import EdgefleetError

logger = logging.getLogger(__name__)

RESULT_WAIT_S = 60.0  # after the stop: a child disconnects its devices and reports within this


def run_fleet(paths: list[Path], runtime: SimulatedRuntime, stop: StopFlag, *, broker: str | None = None,
              duration: float | None = None) -> FleetSummary:
    """Run the devices of ``paths`` in this process until ``stop`` is set or ``duration`` passed."""
    return SimulatedFleet(load_configs(paths, broker=broker), runtime).run(stop, duration)


def run_split(paths: list[Path], runtime: SimulatedRuntime, stop: Any, processes: int, *, broker: str | None = None,
              duration: float | None = None, log_level: int = logging.WARNING) -> FleetSummary:
    """The same across ``processes`` children (``stop``: a ``multiprocessing`` event the caller sets)."""
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    shares = [paths[i::processes] for i in range(processes)]
    children = [
        context.Process(target=_child, args=(share, runtime, stop, broker, duration, log_level, results),
                        name=f"simulate-{i}")
        for i, share in enumerate(shares) if share
    ]
    for child in children:
        child.start()
    parts: list[FleetSummary] = []
    errors: list[str] = []
    while len(parts) + len(errors) < len(children):
        try:
            kind, value = results.get(timeout=1.0)
        except queue.Empty:
            if all(not c.is_alive() for c in children):
                try:  # a last result may still be in the pipe
                    kind, value = results.get(timeout=RESULT_WAIT_S if not stop.is_set() else 5.0)
                except queue.Empty:
                    errors.append("a simulator process died without a summary")
                    break
            else:
                continue
        if kind == "summary":
            parts.append(FleetSummary(**value))
        else:
            errors.append(value)
    for child in children:
        child.join(RESULT_WAIT_S)
    if errors:
        raise EdgefleetError("; ".join(errors))
    return FleetSummary.combined(parts)


def _child(paths: list[Path], runtime: SimulatedRuntime, stop: Any, broker: str | None, duration: float | None,
           log_level: int, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(DeviceName())
    try:
        summary = run_fleet(paths, runtime, stop, broker=broker, duration=duration)
    except EdgefleetError as exc:
        results.put(("error", str(exc)))
        return
    except Exception as exc:  # reported to the parent, which fails the run
        logger.exception("simulator process failed")
        results.put(("error", f"simulator process failed: {exc!r}"))
        return
    results.put(("summary", asdict(summary)))
