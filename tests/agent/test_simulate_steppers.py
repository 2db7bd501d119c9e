"""The simulated fleet's stepping threads: every device belongs to exactly one, and one that fails ends the run.

The devices here are stand-ins (a real fleet needs a broker: ``tests/e2e/test_simulate.py`` runs 500 of
them); what is under test is how ``SimulatedFleet`` shares its devices among its threads.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import agent.simulate.fleet as fleet_module
from agent.simulate.fleet import STEPPERS, SimulatedFleet
from agent.simulate.runtime import SimulatedRuntime


class Once:
    """A stop flag that is set once every device was ticked at least twice."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def is_set(self) -> bool:
        return self.event.is_set()


class CountingService:
    def __init__(self, index: int) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.ticks = 0
        self.threads: set[str] = set()
        self.config = type("Config", (), {"device": type("Device", (), {"name": f"sim-{index}"})()})()

    def handle(self, item: Any) -> None:  # pragma: no cover - nothing is put in the inboxes here
        pass

    def tick(self) -> None:
        self.ticks += 1
        self.threads.add(threading.current_thread().name)


@pytest.fixture
def fleet_of() -> Iterator[Callable[[int], SimulatedFleet]]:
    made: list[SimulatedFleet] = []

    def make(devices: int) -> SimulatedFleet:
        fleet = SimulatedFleet([object()] * devices, SimulatedRuntime())  # type: ignore[list-item]
        fleet.services = [CountingService(i) for i in range(devices)]  # type: ignore[misc]
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.network.stop()  # never started: closes its wake-up sockets


def test_each_device_is_stepped_by_exactly_one_of_the_threads(
    monkeypatch: pytest.MonkeyPatch, fleet_of: Callable[[int], SimulatedFleet]
) -> None:
    monkeypatch.setattr(fleet_module, "TICK_S", 0.01)
    fleet = fleet_of(3 * STEPPERS + 1)
    stop = Once()
    threading.Timer(0.3, stop.event.set).start()
    fleet._step_all(stop, deadline=None)
    services: list[CountingService] = fleet.services  # type: ignore[assignment]
    assert all(s.ticks >= 2 for s in services)
    assert all(len(s.threads) == 1 for s in services)
    assert len({name for s in services for name in s.threads}) == STEPPERS


def test_a_stepping_thread_that_fails_ends_the_run_with_its_error(
    monkeypatch: pytest.MonkeyPatch, fleet_of: Callable[[int], SimulatedFleet]
) -> None:
    monkeypatch.setattr(fleet_module, "TICK_S", 0.01)
    fleet = fleet_of(2 * STEPPERS)
    broken: CountingService = fleet.services[3]  # type: ignore[assignment]

    def tick() -> None:
        raise RuntimeError("a bug in one device's step")

    broken.tick = tick  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug in one device's step"):
        fleet._step_all(Once(), deadline=time.monotonic() + 10)  # the failure alone ends every thread
