"""The device as the agent sees it at the end of a report's interval; None where it is not readable."""

from __future__ import annotations

import glob
import os
import resource
import sys
import time
from collections.abc import Callable

from shared.messages import SystemStats


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # the peak, where the current value is not readable
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _hottest_c(pattern: str) -> float | None:
    temperatures = []
    for path in glob.glob(pattern):
        try:
            with open(path, encoding="ascii") as zone:
                temperatures.append(int(zone.read().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temperatures) if temperatures else None


def _load_per_cpu() -> float | None:
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    return round(load / (os.cpu_count() or 1), 4)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class SystemSampler:
    """``sample()`` reads load, this process's CPU % since the previous sample, RSS and temperature."""

    def __init__(self, *, thermal_glob: str = "/sys/class/thermal/thermal_zone*/temp",
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.thermal_glob = thermal_glob
        self.monotonic = monotonic
        self._last = (monotonic(), _cpu_seconds())

    def sample(self) -> SystemStats:
        now, cpu = self.monotonic(), _cpu_seconds()
        (then, cpu_then), self._last = self._last, (now, cpu)
        elapsed = now - then
        percent = round(100.0 * (cpu - cpu_then) / elapsed, 2) if elapsed > 0 else None
        return SystemStats(load_1m=_load_per_cpu(), cpu_percent=percent, rss_bytes=_rss_bytes(),
                           temperature_c=_hottest_c(self.thermal_glob))
