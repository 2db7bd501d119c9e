"""What an operator does to a live rollout: pause, resume, abort, roll back.

Each is a state change and an audit entry, committed together; the running
server's engine carries out the consequences on its next tick (it holds the
broker connection and the keys that sign reverts).
"""

from __future__ import annotations

from datetime import datetime, timezone

from server import audit
from server.db import Database, Session, queries
from server.db.models import Rollout
from server.rollouts.states import RolloutState, TransitionError, WaveState, move
from shared.errors import NotFoundError, UserInputError


class RolloutStateConflict(UserInputError):
    """The rollout's current state does not allow this change (e.g. resuming a finished rollout)."""


def _rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = queries.rollout(session, rollout_id)
    if rollout is None:
        raise NotFoundError(f"unknown rollout {rollout_id!r}; 'edgefleet rollout list' shows them")
    return rollout


def _change(session: Session, rollout: Rollout, target: RolloutState, verb: str, actor: str) -> None:
    current = RolloutState(rollout.state)
    try:
        rollout.state = move(current, target).value
    except TransitionError:
        raise RolloutStateConflict(f"rollout {rollout.id} is {current.value}: it cannot be {verb}") from None
    rollout.state_reason = f"{verb} by {actor}"
    if target is not RolloutState.RUNNING and target is not RolloutState.PAUSED:
        rollout.finished_at = datetime.now(timezone.utc)
    audit.record(session, f"rollout.{target.value}", f"rollout {verb} (was {current.value})", actor=actor,
                 rollout_id=rollout.id)


def pause_rollout(db: Database, rollout_id: str, actor: str) -> None:
    """No further wave starts (and no newcomer is sent the version) until resumed; devices under way finish."""
    with db.session() as session:
        _change(session, _rollout(session, rollout_id), RolloutState.PAUSED, "paused", actor)


def resume_rollout(db: Database, rollout_id: str, actor: str) -> None:
    """Go on; a wave whose gate failed is passed by the operator's decision (the log says so)."""
    with db.session() as session:
        rollout = _rollout(session, rollout_id)
        _change(session, rollout, RolloutState.RUNNING, "resumed", actor)
        for wave in rollout.waves:
            if wave.state == WaveState.FAILED.value:
                wave.state = move(WaveState.FAILED, WaveState.OVERRIDDEN).value
                audit.record(session, "wave.overridden", f"wave {wave.index + 1} ({wave.spec}) failed its gate; "
                             "the operator resumed past it", actor=actor, rollout_id=rollout.id,
                             data={"wave": wave.index, "gates": wave.gates})


def abort_rollout(db: Database, rollout_id: str, actor: str) -> None:
    """Stop: nothing more is sent, what was sent and not started is withdrawn, installed devices keep it."""
    with db.session() as session:
        _change(session, _rollout(session, rollout_id), RolloutState.ABORTED, "aborted", actor)


def rollback_rollout(db: Database, rollout_id: str, actor: str) -> None:
    """Every device this rollout changed gets its previous version back; the rest are left alone."""
    with db.session() as session:
        _change(session, _rollout(session, rollout_id), RolloutState.ROLLED_BACK, "rolled back", actor)
