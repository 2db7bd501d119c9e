"""How much memory a trial may use on this device, and why.

A fixed limit is wrong both ways: on a 2 GB Pi a 4 GiB cap lets a hostile or
oversized model meet the kernel's out-of-memory killer (which may pick the
agent) before the cap, and on a big box it refuses models that would fit. So
the trial gets the smallest of: the target profile's RAM limit (signed into
the manifest), the agent's own cap if its config sets one, and most of the
memory available right now, leaving a margin for the agent and the system.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
MEMINFO = Path("/proc/meminfo")
AVAILABLE_SHARE = 0.9  # of MemAvailable; the rest stays for the agent, page cache and other services
FLOOR_BYTES = 64 * MiB  # below this no runtime starts: let the trial say "oom" rather than not run
UNKNOWN_LIMIT_BYTES = 4096 * MiB  # nothing known about the device (not Linux, no profile limit, no cap)


@dataclass(frozen=True)
class MemoryBudget:
    limit_bytes: int
    why: str  # which bound applied, for the reason a failed trial reports

    @property
    def limit_mb(self) -> int:
        return max(1, self.limit_bytes // MiB)


def available_memory_bytes(meminfo: Path = MEMINFO) -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable), if readable."""
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def trial_memory_budget(profile_limit: int | None, configured_mb: int, available: int | None) -> MemoryBudget:
    """The smallest of the bounds that are known; see the module docstring."""
    bounds: list[tuple[int, str]] = []
    if profile_limit is not None and profile_limit > 0:
        bounds.append((profile_limit, f"the profile's RAM limit of {profile_limit // MiB} MiB"))
    if configured_mb > 0:
        bounds.append((configured_mb * MiB, f"the agent's trial.memory_limit_mb of {configured_mb} MiB"))
    if available is not None:
        share = int(available * AVAILABLE_SHARE)
        bounds.append((share, f"{AVAILABLE_SHARE:.0%} of the {available // MiB} MiB available now"))
    if not bounds:
        return MemoryBudget(UNKNOWN_LIMIT_BYTES, f"a default of {UNKNOWN_LIMIT_BYTES // MiB} MiB")
    limit, why = min(bounds)
    return MemoryBudget(max(limit, FLOOR_BYTES), f"limit {max(limit, FLOOR_BYTES) // MiB} MiB: {why}")
