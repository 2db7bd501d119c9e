"""What a model build reports while it works: one event per step, and its plain line.

``build_profiles`` calls its ``progress`` callback with a ``BuildEvent`` at
each step: a profile starts, a candidate variant starts, its transform
(retraining), conversion and measurement (accuracy and latency in the
agents' interpreter) start, and the variant is done. ``str(event)`` is the
plain line a log or a non-terminal stderr gets; ``server.build_progress``
draws bars from the same events on a terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class Step(str, Enum):
    PROFILE = "profile"  # a profile's build starts: ``total`` candidates
    VARIANT = "variant"  # candidate ``index`` of ``total`` starts
    TRANSFORM = "transform"  # retraining: pruning, distillation, low-rank
    CONVERT = "convert"
    MEASURE = "measure"  # evaluate and benchmark in a child process
    DONE = "done"  # the candidate is built and measured (or failed): ``detail`` says how it went
    DEVICE = "device"  # benchmark-only trials on the profile's reference devices: sent, then each result


# The steps of one candidate, in order (TRANSFORM only for recipes that retrain).
VARIANT_STEPS = (Step.TRANSFORM, Step.CONVERT, Step.MEASURE)


@dataclass(frozen=True)
class BuildEvent:
    step: Step
    profile: str
    recipe: str = ""
    index: int = 0  # 1-based: which candidate (PROFILE: which profile of the build)
    total: int = 0  # how many candidates the profile has
    detail: str = ""
    failed: bool = False  # DONE: the candidate failed

    def __str__(self) -> str:
        if self.step is Step.PROFILE:
            return f"{self.profile}: {self.total} candidate{'s' if self.total != 1 else ''} to build and measure"
        where = f"{self.profile}: {self.recipe}"
        if self.step is Step.VARIANT:
            return f"{where} ({self.index}/{self.total})"
        if self.step is Step.DEVICE and not self.recipe:
            return f"{self.profile}: {self.detail}"
        if self.step is Step.DONE:
            return f"{where}: {'failed' if self.failed else 'done'}{': ' + self.detail if self.detail else ''}"
        return f"{where}: {self.step.value}{' ' + self.detail if self.detail else ''}"


ProgressCallback = Callable[[BuildEvent], object]


def ignore(event: BuildEvent) -> None:
    """The default callback: nobody is watching."""
