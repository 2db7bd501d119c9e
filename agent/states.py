"""The agent's update state machine, as data.

State and event values are persisted in the update record: never rename them.
``TRANSITIONS`` is the only place an edge exists; ``next_state`` raises on an
unknown (state, event). ``RESUME_FROM`` says where each saved state continues
after a restart: a crash during the trial means the model may have crashed
us, so it rolls back. ``SUPERSEDABLE`` names the states a newer directive
cancels through their FAILURE edge.
"""

from __future__ import annotations

import enum

from shared.messages import UpdateState


class State(enum.Enum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    FAILED = "failed"


class Event(enum.Enum):
    ACCEPTED = "accepted"  # a directive passed every trust check
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED_OK = "staged_ok"
    GATES_PASSED = "gates_passed"
    GATES_FAILED = "gates_failed"
    FAILURE = "failure"
    DONE = "done"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.IDLE, Event.ACCEPTED): State.DOWNLOADING,
    (State.DOWNLOADING, Event.DOWNLOADED): State.VERIFYING,
    (State.DOWNLOADING, Event.FAILURE): State.FAILED,
    (State.VERIFYING, Event.VERIFIED): State.STAGED,
    (State.VERIFYING, Event.FAILURE): State.FAILED,
    (State.STAGED, Event.STAGED_OK): State.TRIAL,
    (State.STAGED, Event.FAILURE): State.FAILED,
    (State.TRIAL, Event.GATES_PASSED): State.COMMITTED,
    (State.TRIAL, Event.GATES_FAILED): State.ROLLING_BACK,
    (State.TRIAL, Event.FAILURE): State.ROLLING_BACK,
    (State.COMMITTED, Event.DONE): State.IDLE,
    (State.COMMITTED, Event.FAILURE): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.DONE): State.IDLE,
    (State.FAILED, Event.DONE): State.IDLE,
}

RESUME_FROM: dict[State, State] = {
    State.IDLE: State.IDLE,
    State.DOWNLOADING: State.DOWNLOADING,
    State.VERIFYING: State.VERIFYING,
    State.STAGED: State.STAGED,
    State.TRIAL: State.ROLLING_BACK,
    State.COMMITTED: State.COMMITTED,
    State.ROLLING_BACK: State.ROLLING_BACK,
    State.FAILED: State.FAILED,
}

# States a verified newer directive cancels (FAILURE, reason "superseded by deployment <id>"): nothing of
# the current deployment runs yet, so the operator's newer word wins at once; an aborted rollout must never
# go on to install. From the trial on, the newer directive waits until the current deployment ends.
SUPERSEDABLE: frozenset[State] = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED})

# What the server sees for each state (the deployment's reported state).
REPORTED: dict[State, UpdateState | None] = {
    State.IDLE: None,
    State.DOWNLOADING: UpdateState.DOWNLOADING,
    State.VERIFYING: UpdateState.VERIFYING,
    State.STAGED: UpdateState.STAGED,
    State.TRIAL: UpdateState.TRIAL,
    State.COMMITTED: UpdateState.COMMITTED,
    State.ROLLING_BACK: UpdateState.ROLLED_BACK,
    State.FAILED: UpdateState.FAILED,
}


class TransitionError(RuntimeError):
    """A (state, event) pair with no edge: a programming error."""


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state.value} on {event.value}") from None
