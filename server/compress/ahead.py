"""Converting the next candidate while the current one is measured.

A build converts a candidate (seconds of one core in the converter) and then measures it (a child
process timing it with the profile's thread count). With cores to spare, the next plain candidate's
conversion runs on a worker thread during the current one's measurement; measurements stay one at a time.
On a host without them the two would share cores and the measurement would time the conversion too, so
it is off there (``can_overlap``). Only plain candidates (no retraining) overlap, and only with a plain
candidate's measurement, so there is never more than one conversion at a time.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from server.compress.recipes import Recipe

SPARE_CORES = 2  # besides the measurement's threads: one converts, one for everything else


def can_overlap(threads: int) -> bool:
    return (os.cpu_count() or 1) >= threads + SPARE_CORES


class ConversionAhead:
    def __init__(self, inputs: Any, *, enabled: bool) -> None:
        self.inputs = inputs
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="convert-ahead") if enabled else None
        self._started: dict[str, Future[bytes]] = {}

    def start(self, recipe: Recipe | None) -> None:
        """Begin converting ``recipe`` (a plain one) on the worker thread, if overlapping is on."""
        if self._pool is None or recipe is None or recipe.transforms or str(recipe) in self._started:
            return
        representative = (self.inputs.train or self.inputs.evalset).x
        self._started[str(recipe)] = self._pool.submit(self.inputs.source.convert, recipe.quantization,
                                                       representative)

    def take(self, recipe: Recipe) -> Future[bytes] | None:
        """The conversion started for ``recipe``, if one was."""
        return self._started.pop(str(recipe), None)

    def close(self) -> None:
        """Wait for a conversion under way; drop those nobody took."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
