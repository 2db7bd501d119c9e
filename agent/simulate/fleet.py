"""Many simulated devices in one process, on a handful of threads.

Each device is a real ``AgentService`` (updater, trust, download, slots,
outbox on disk under its own data directory) with the runtime stand-in of
``agent/simulate/runtime.py``. Instead of a paho thread and a loop thread per
device: one ``SharedNetwork`` thread drives every connection, and
``STEPPERS`` threads step the services, each its own share of them: the one
whose inbox just received something at once (its inbox says so), and all of
them every ``TICK_S``, as a real agent's loop does when its inbox stays empty.

Why several stepping threads: an install is mostly durable writes (the
update record, the outbox, the slot, each fsynced), and a real device waits
for its own disk while the others wait for theirs. One thread stepping
thousands of devices would wait for every fsync in turn; the fleet fell
behind its chunks, whose copies then piled up in the inboxes (0.8 MiB per
device). fsync releases the GIL, so the steppers' waits overlap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from agent.config import AgentConfig, load_config
from agent.service import AgentService
from agent.simulate.network import SharedNetwork, acting_for
from agent.simulate.runtime import RUNTIME_NAME, RUNTIME_VERSION, NoServing, SimulatedRuntime
from agent.updater import Updater
from shared.errors import ConfigError, EdgefleetError
from shared.interpreter import RuntimeInfo

logger = logging.getLogger(__name__)

TICK_S = 0.5  # as a real agent's loop: its inbox wait
STEPPERS = 8  # threads stepping the services (device i belongs to thread i % STEPPERS)
STOP_GRACE_S = 10.0


class ReadyInbox(queue.Queue[Any]):
    """A device's inbox that tells the fleet's stepping thread which device has work."""

    def __init__(self, index: int, ready: queue.SimpleQueue[int]) -> None:
        super().__init__()
        self._index = index
        self._ready = ready

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ready.put(self._index)


class SimulatedAgent(AgentService):
    """The real agent, reporting the stand-in runtime instead of probing for an interpreter."""

    def _runtime(self) -> RuntimeInfo:
        return RuntimeInfo(RUNTIME_NAME, RUNTIME_VERSION)


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


def config_paths(directory: Path, devices: int | None = None) -> list[Path]:
    """The agent.toml files in ``directory`` in name order: all, or the first ``devices``."""
    paths = sorted(directory.glob("*.toml"))
    if not paths:
        raise ConfigError(f"no agent configs (*.toml) in {directory}: write them with 'edgefleet device "
                          "register-fleet --out-dir'")
    if devices is not None:
        if not 0 < devices <= len(paths):
            raise ConfigError(f"--devices must be between 1 and the {len(paths)} configs in {directory}, got "
                              f"{devices}")
        paths = paths[:devices]
    return paths


def load_configs(paths: list[Path], *, broker: str | None = None) -> list[AgentConfig]:
    """Each config, with ``broker`` instead of the URL it names."""
    configs = [load_config(path) for path in paths]
    if broker is not None:
        configs = [replace(c, broker=replace(c.broker, url=broker)) for c in configs]
        configs[0].broker_address()  # a bad URL is one clear error, not one per device
    return configs


@dataclass
class FleetSummary:
    """What one process (or, added up, every process) saw; the numbers ``bench/`` reads from ``--json``."""

    devices: int
    processes: int = 1
    seconds: float = 0.0
    start_seconds: float = 0.0  # building the services and handing every link to the network loop
    connected: int = 0  # at the end
    connect_attempts: int = 0
    connect_failures: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)  # how each device's last deployment ended
    active: dict[str, int] = field(default_factory=dict)  # "model vN" -> devices running it
    threads: int = 0  # the process's threads while running (per process, summed over processes)
    rss_bytes: int = 0  # resident memory at the end (summed over processes)
    base_rss_bytes: int = 0  # ... before the devices were built (summed)

    @property
    def rss_per_1000_devices_mib(self) -> float:
        return (self.rss_bytes - self.base_rss_bytes) / max(self.devices, 1) * 1000 / 2**20

    @property
    def threads_per_1000_devices(self) -> float:
        return self.threads / max(self.devices, 1) * 1000

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rss_per_1000_devices_mib": round(self.rss_per_1000_devices_mib, 1),
                "threads_per_1000_devices": round(self.threads_per_1000_devices, 2)}

    @classmethod
    def combined(cls, parts: list[FleetSummary]) -> FleetSummary:
        def added(key: Callable[[FleetSummary], dict[str, int]]) -> dict[str, int]:
            total: Counter[str] = Counter()
            for part in parts:
                total.update(key(part))
            return dict(sorted(total.items()))

        return cls(
            devices=sum(p.devices for p in parts), processes=len(parts), seconds=max(p.seconds for p in parts),
            start_seconds=max(p.start_seconds for p in parts), connected=sum(p.connected for p in parts),
            connect_attempts=sum(p.connect_attempts for p in parts),
            connect_failures=sum(p.connect_failures for p in parts), outcomes=added(lambda p: p.outcomes),
            active=added(lambda p: p.active), threads=sum(p.threads for p in parts),
            rss_bytes=sum(p.rss_bytes for p in parts), base_rss_bytes=sum(p.base_rss_bytes for p in parts),
        )


def process_memory() -> tuple[int, int]:
    """(resident bytes, threads) of this process, from /proc; (0, Python's thread count) elsewhere."""
    rss, threads = 0, threading.active_count()
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except OSError:
        pass
    return rss, threads


class SimulatedFleet:
    def __init__(self, configs: list[AgentConfig], runtime: SimulatedRuntime) -> None:
        self.configs = configs
        self.runtime = runtime
        self.network = SharedNetwork()
        self._steppers = max(1, min(STEPPERS, len(configs)))
        self._ready: list[queue.SimpleQueue[int]] = [queue.SimpleQueue() for _ in range(self._steppers)]
        self.services: list[AgentService] = []
        self._failure: Exception | None = None  # what ended a stepping thread, raised by run()

    def _service(self, index: int, config: AgentConfig) -> AgentService:
        starter = self.runtime.starter(config.device.id)

        def updater(config: AgentConfig, reporter: Any) -> Updater:
            return Updater(config, reporter, start_trial=starter)

        return SimulatedAgent(config, updater_factory=updater, serving_factory=lambda *a, **k: NoServing(),
                              inbox=ReadyInbox(index, self._ready[index % self._steppers]), network=self.network)

    def run(self, stop: StopFlag, duration: float | None = None) -> FleetSummary:
        """Run every device until ``stop`` is set (or ``duration`` seconds passed), then disconnect them."""
        started = time.monotonic()
        base_rss, _ = process_memory()
        self.network.start()
        summary = FleetSummary(devices=len(self.configs), base_rss_bytes=base_rss)
        try:
            for index, config in enumerate(self.configs):
                service = self._service(index, config)
                self.services.append(service)
                acting_for.name = config.device.name
                service.begin()
            summary.start_seconds = time.monotonic() - started
            logger.info("%d simulated devices started in %.1f s", len(self.services), summary.start_seconds)
            deadline = None if duration is None else started + duration
            self._step_all(stop, deadline)
            summary.rss_bytes, summary.threads = process_memory()
        finally:
            summary.connected = sum(1 for s in self.services if s.link.connected.is_set())
            self._finish()
        summary.seconds = time.monotonic() - started
        summary.connect_attempts = self.network.connect_attempts
        summary.connect_failures = self.network.connect_failures
        summary.outcomes = dict(sorted(Counter(
            s.updater.record.outcome for s in self.services if s.updater.record.outcome is not None
        ).items()))
        summary.active = dict(sorted(Counter(_active(s) for s in self.services).items()))
        return summary

    def _step_all(self, stop: StopFlag, deadline: float | None) -> None:
        """Step every share of the devices on its own thread until ``stop`` or ``deadline``; the caller's
        thread waits with them (and raises what ended one of them: the others then stop too)."""
        threads = [threading.Thread(target=self._loop, args=(k, stop, deadline), name=f"simulate-step-{k}",
                                    daemon=True) for k in range(self._steppers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._failure is not None:
            raise self._failure

    def _loop(self, share: int, stop: StopFlag, deadline: float | None) -> None:
        try:
            self._run_share(share, stop, deadline)
        except Exception as exc:  # ends the fleet: run() raises it on the caller's thread
            logger.exception("simulator stepping thread %d failed: stopping every device", share)
            self._failure = self._failure or exc

    def _run_share(self, share: int, stop: StopFlag, deadline: float | None) -> None:
        services = self.services[share::self._steppers]
        ready_queue = self._ready[share]
        next_tick = time.monotonic() + TICK_S
        while not stop.is_set() and self._failure is None and (deadline is None or time.monotonic() < deadline):
            ready: set[int] = set()
            try:
                ready.add(ready_queue.get(timeout=max(0.0, min(next_tick - time.monotonic(), TICK_S))))
                while True:
                    ready.add(ready_queue.get_nowait())
            except queue.Empty:
                pass
            for index in sorted(ready):
                self._step(self.services[index], tick=True)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                for service in services:
                    self._step(service, tick=True)

    def _step(self, service: AgentService, *, tick: bool) -> None:
        acting_for.name = service.config.device.name
        while True:
            try:
                item = service.inbox.get_nowait()
            except queue.Empty:
                break
            service.handle(item)
        if tick:
            service.tick()

    def _finish(self) -> None:
        for service in self.services:
            acting_for.name = service.config.device.name
            try:
                service.finish()
            except (EdgefleetError, OSError) as exc:
                logger.warning("could not stop %s cleanly: %s", service.config.device.name, exc)
        acting_for.name = None
        self.network.stop(STOP_GRACE_S)


def _active(service: AgentService) -> str:
    manifest, _ = service.updater.active_summary()
    return "none" if manifest is None else f"{manifest.model} v{manifest.version}"
