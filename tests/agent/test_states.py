"""The agent's update state machine as data: edges, reachability, resume table, persisted names."""

from __future__ import annotations

import collections
import itertools

import pytest

from agent.states import (
    REPORTED,
    RESUME_FROM,
    SUPERSEDABLE,
    TRANSITIONS,
    Event,
    State,
    TransitionError,
    next_state,
)
from shared.messages import UpdateState

IN_FLIGHT = (State.DOWNLOADING, State.VERIFYING, State.STAGED, State.TRIAL, State.COMMITTED)
BEFORE_TRIAL = (State.DOWNLOADING, State.VERIFYING, State.STAGED)


def reachable_from(start: State) -> set[State]:
    graph: dict[State, set[State]] = collections.defaultdict(set)
    for (source, _), target in TRANSITIONS.items():
        graph[source].add(target)
    seen, queue = {start}, collections.deque([start])
    while queue:
        for target in graph[queue.popleft()]:
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return seen


@pytest.mark.parametrize("state", IN_FLIGHT, ids=lambda s: s.value)
def test_every_in_flight_state_has_a_failure_edge(state: State) -> None:
    assert (state, Event.FAILURE) in TRANSITIONS
    # Design: a failure before the trial leaves the previous model untouched (FAILED); from the
    # trial on, a new slot exists and must be rolled back.
    expected = State.FAILED if state in BEFORE_TRIAL else State.ROLLING_BACK
    assert next_state(state, Event.FAILURE) is expected


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
def test_every_state_can_reach_idle(state: State) -> None:
    assert State.IDLE in reachable_from(state)


def test_idle_reaches_every_state() -> None:
    assert reachable_from(State.IDLE) == set(State)


def test_the_happy_path_and_the_documented_failure_paths_are_edges() -> None:
    happy = [
        (State.IDLE, Event.ACCEPTED, State.DOWNLOADING),
        (State.DOWNLOADING, Event.DOWNLOADED, State.VERIFYING),
        (State.VERIFYING, Event.VERIFIED, State.STAGED),
        (State.STAGED, Event.STAGED_OK, State.TRIAL),
        (State.TRIAL, Event.GATES_PASSED, State.COMMITTED),
        (State.COMMITTED, Event.DONE, State.IDLE),
        (State.TRIAL, Event.GATES_FAILED, State.ROLLING_BACK),
        (State.ROLLING_BACK, Event.DONE, State.IDLE),
        (State.FAILED, Event.DONE, State.IDLE),
    ]
    for source, event, target in happy:
        assert next_state(source, event) is target


def test_terminal_states_only_finish() -> None:
    for state in (State.ROLLING_BACK, State.FAILED):
        assert {event for (source, event) in TRANSITIONS if source is state} == {Event.DONE}


def test_unknown_pairs_raise_transition_error() -> None:
    missing = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in TRANSITIONS]
    assert missing, "every pair has an edge? the table cannot be that dense"
    for state, event in missing:
        with pytest.raises(TransitionError, match=f"no transition from {state.value} on {event.value}"):
            next_state(state, event)


def test_transition_error_examples() -> None:
    with pytest.raises(TransitionError):
        next_state(State.IDLE, Event.DONE)
    with pytest.raises(TransitionError):
        next_state(State.IDLE, Event.FAILURE)  # nothing in flight: a failure here is a programming error
    with pytest.raises(TransitionError):
        next_state(State.DOWNLOADING, Event.GATES_PASSED)


def test_a_newer_directive_cancels_only_before_the_trial_through_the_failure_edge() -> None:
    """Superseding is no new edge: the FAILURE edge to FAILED, which leaves the previous model untouched."""
    assert SUPERSEDABLE == set(BEFORE_TRIAL)
    for state in SUPERSEDABLE:
        assert next_state(state, Event.FAILURE) is State.FAILED


def test_resume_table_covers_every_state() -> None:
    assert set(RESUME_FROM) == set(State)
    assert set(REPORTED) == set(State)


def test_a_crash_during_the_trial_rolls_back() -> None:
    assert RESUME_FROM[State.TRIAL] is State.ROLLING_BACK


def test_resume_targets_have_a_handler_path_to_idle() -> None:
    for saved, resumed in RESUME_FROM.items():
        assert State.IDLE in reachable_from(resumed), saved


def test_reported_states_match_the_wire_enum() -> None:
    assert REPORTED[State.IDLE] is None
    assert REPORTED[State.ROLLING_BACK] is UpdateState.ROLLED_BACK
    for state in IN_FLIGHT + (State.FAILED,):
        assert REPORTED[state] is UpdateState(state.value)


def test_persisted_state_values_never_change() -> None:
    assert {s.name: s.value for s in State} == {
        "IDLE": "idle",
        "DOWNLOADING": "downloading",
        "VERIFYING": "verifying",
        "STAGED": "staged",
        "TRIAL": "trial",
        "COMMITTED": "committed",
        "ROLLING_BACK": "rolling_back",
        "FAILED": "failed",
    }


def test_persisted_event_values_never_change() -> None:
    assert {e.name: e.value for e in Event} == {
        "ACCEPTED": "accepted",
        "DOWNLOADED": "downloaded",
        "VERIFIED": "verified",
        "STAGED_OK": "staged_ok",
        "GATES_PASSED": "gates_passed",
        "GATES_FAILED": "gates_failed",
        "FAILURE": "failure",
        "DONE": "done",
    }


def test_reported_update_state_values_never_change() -> None:
    assert [u.value for u in UpdateState] == [
        "pending",
        "downloading",
        "verifying",
        "staged",
        "trial",
        "committed",
        "rolled_back",
        "failed",
    ]
