"""Rollout, wave and deployment states, as data.

Values are persisted: never rename them. ``*_TRANSITIONS`` are the only edges;
``move`` raises on any other. A rollout in a final state never leaves it; a
succeeded rollout is settled but may still be rolled back by an operator.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from shared.messages import SUPERSEDED_BY, UpdateState


class RolloutState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"
    FAILED = "failed"  # it could not go on at all (nothing left to roll out to)

    @property
    def is_final(self) -> bool:
        return self in (RolloutState.ROLLED_BACK, RolloutState.ABORTED, RolloutState.FAILED)


ROLLOUT_TRANSITIONS: frozenset[tuple[RolloutState, RolloutState]] = frozenset({
    (RolloutState.RUNNING, RolloutState.PAUSED),
    (RolloutState.RUNNING, RolloutState.SUCCEEDED),
    (RolloutState.RUNNING, RolloutState.ROLLED_BACK),
    (RolloutState.RUNNING, RolloutState.ABORTED),
    (RolloutState.RUNNING, RolloutState.FAILED),
    (RolloutState.PAUSED, RolloutState.RUNNING),
    (RolloutState.PAUSED, RolloutState.ROLLED_BACK),
    (RolloutState.PAUSED, RolloutState.ABORTED),
    (RolloutState.SUCCEEDED, RolloutState.ROLLED_BACK),  # an operator regrets a release
})


class WaveState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    OVERRIDDEN = "overridden"  # failed, and an operator resumed the rollout past it
    CANCELLED = "cancelled"  # the rollout ended before this wave finished

    @property
    def is_through(self) -> bool:
        """The rollout may go on to the next wave."""
        return self in (WaveState.PASSED, WaveState.OVERRIDDEN)


WAVE_TRANSITIONS: frozenset[tuple[WaveState, WaveState]] = frozenset({
    (WaveState.WAITING, WaveState.RUNNING),
    (WaveState.WAITING, WaveState.CANCELLED),
    (WaveState.RUNNING, WaveState.PASSED),
    (WaveState.RUNNING, WaveState.FAILED),
    (WaveState.RUNNING, WaveState.CANCELLED),
    (WaveState.FAILED, WaveState.OVERRIDDEN),
})


class DeploymentState(enum.Enum):
    """A deployment as the server records it: the states agents report, plus two only the server draws."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELLED = "cancelled"  # withdrawn before the device finished it (abort, rollback, left the selection)
    REMOVED = "removed"  # the device was removed

    @property
    def is_final(self) -> bool:
        return self in FINAL_DEPLOYMENT_STATES

    @property
    def is_failure(self) -> bool:
        return self in (DeploymentState.ROLLED_BACK, DeploymentState.FAILED)

    @classmethod
    def of(cls, reported: UpdateState) -> DeploymentState:
        return cls(reported.value)


FINAL_DEPLOYMENT_STATES = frozenset({
    DeploymentState.COMMITTED, DeploymentState.ROLLED_BACK, DeploymentState.FAILED, DeploymentState.CANCELLED,
    DeploymentState.REMOVED,
})
# The order in which a device works through a deployment: a report never moves one backwards.
PROGRESS = (DeploymentState.PENDING, DeploymentState.DOWNLOADING, DeploymentState.VERIFYING, DeploymentState.STAGED,
            DeploymentState.TRIAL)


# The reason of a deployment the server failed because its device took a newer directive without a word
# about it: like CANCELLED, a conclusion the device's own final report replaces.
SUPERSEDED = "superseded by a newer rollout"


def superseded(reason: str) -> bool:
    """The deployment ended because something newer took its device: the server saw it go unsent, or the
    agent cancelled it before its trial for a newer directive. Not a verdict on the version."""
    return reason == SUPERSEDED or reason.startswith(SUPERSEDED_BY)


class DeploymentKind(enum.Enum):
    INSTALL = "install"  # the rollout's version
    REVERT = "revert"  # the device's previous version, back after a fleet rollback


class TransitionError(RuntimeError):
    """An edge not in the table: a programming error."""


S = TypeVar("S", RolloutState, WaveState)


def move(current: S, target: S) -> S:
    """``target`` if the table has the edge ``current -> target``; raises otherwise."""
    table = ROLLOUT_TRANSITIONS if isinstance(current, RolloutState) else WAVE_TRANSITIONS
    if (current, target) not in table:
        raise TransitionError(f"no transition from {current.value} to {target.value}")
    return target
