"""Fault injection for the real-process tests: SIGKILL this process at a named point.

The crash tests must kill an agent *in* a given install state, not roughly
around it, so the code names its dangerous moments (etcd's gofail does the
same) and a test arms one through the environment of the process it starts::

    EDGEFLEET_FAILPOINTS="agent.saved.trial=kill+300ms"   # 300 ms into the trial
    EDGEFLEET_FAILPOINTS="agent.chunk.stored=kill@2"      # when the 2nd chunk is on disk

``kill`` sends SIGKILL to the process itself (no cleanup, no atexit: a power
cut, as far as the process can tell), on the Nth hit with ``@N`` (default the
first), after a delay with ``+MSms`` (from a timer thread, so the process
goes on working meanwhile). Unset, a failpoint costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENV = "EDGEFLEET_FAILPOINTS"
_ACTION = re.compile(r"kill(?:@(?P<hit>[1-9][0-9]*))?(?:\+(?P<ms>[0-9]+)ms)?")


@dataclass(frozen=True)
class Failpoint:
    hit: int = 1
    delay_ms: int = 0


def parse(spec: str) -> dict[str, Failpoint]:
    """``name=action[,name=action...]``; raises ValueError on anything else."""
    points: dict[str, Failpoint] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        match = _ACTION.fullmatch(action.strip())
        if not name or match is None:
            raise ValueError(f"{ENV}: cannot read {item!r}; expected name=kill[@N][+MSms]")
        points[name.strip()] = Failpoint(int(match["hit"] or 1), int(match["ms"] or 0))
    return points


_armed = parse(os.environ.get(ENV, ""))
_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """Kill this process here if a test armed ``name`` for this hit."""
    point = _armed.get(name)
    if point is None:
        return
    _hits[name] += 1
    if _hits[name] != point.hit:
        return
    logger.warning("failpoint %s: SIGKILL%s", name, f" in {point.delay_ms} ms" if point.delay_ms else "")
    if point.delay_ms:
        timer = threading.Timer(point.delay_ms / 1000, _kill)
        timer.daemon = True
        timer.start()
    else:
        _kill()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
