"""``/api/v1`` write routes: what an operator does to a live rollout, over HTTP.

Each calls ``server.rollouts.control`` exactly as ``edgefleet rollout pause|resume|abort|rollback`` does,
with the caller's token as the audit log's actor (``token <name>``); the running server's engine carries
the change out on its next tick. Only an ``operator`` token may call them (``server.web.auth``), even on
loopback with auth off. An unknown rollout is 404; a change its state does not allow is 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from server.api_tokens import Principal
from server.db import Database, queries
from server.rollouts import control
from server.web.api import DB
from server.web.auth import caller
from server.web.problems import CONFLICT, PROBLEM_JSON, problem

router = APIRouter(prefix="/api/v1", tags=["operator"], dependencies=[Security(HTTPBearer(auto_error=False))])

_PROBLEM: dict[str, Any] = {"content": {PROBLEM_JSON: {}}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {**_PROBLEM, "description": "No token, or one that is unknown, rotated or revoked"},
    403: {**_PROBLEM, "description": "The token's scope is not operator"},
    404: {**_PROBLEM, "description": "Unknown rollout"},
    409: {**_PROBLEM, "description": "The rollout's state does not allow this (the detail says why)"},
}


def operator(request: Request) -> Principal:
    principal = caller(request)
    assert principal is not None, "the auth middleware lets a write through only with an operator token"
    return principal


Operator = Annotated[Principal, Depends(operator)]


def _act(action: Callable[[Database, str, str], None], db: Database, rollout_id: str,
         principal: Principal) -> JSONResponse:
    try:
        action(db, rollout_id, principal.actor)
    except control.RolloutStateConflict as exc:
        return problem(409, CONFLICT, str(exc))
    with db.reading() as session:
        rollout = queries.rollout(session, rollout_id)
        assert rollout is not None
        body = {"rollout": rollout.id, "state": rollout.state, "state_reason": rollout.state_reason,
                "actor": principal.actor}
    return JSONResponse(body)


@router.post("/rollouts/{rollout_id}/pause", summary="Pause a rollout: no further wave starts until resumed",
             responses=RESPONSES)
def pause(rollout_id: str, db: DB, principal: Operator) -> JSONResponse:
    return _act(control.pause_rollout, db, rollout_id, principal)


@router.post("/rollouts/{rollout_id}/resume", summary="Resume a paused rollout (past a failed gate, if one failed)",
             responses=RESPONSES)
def resume(rollout_id: str, db: DB, principal: Operator) -> JSONResponse:
    return _act(control.resume_rollout, db, rollout_id, principal)


@router.post("/rollouts/{rollout_id}/abort", summary="Abort a rollout: nothing more is sent; installed devices keep it",
             responses=RESPONSES)
def abort(rollout_id: str, db: DB, principal: Operator) -> JSONResponse:
    return _act(control.abort_rollout, db, rollout_id, principal)


@router.post("/rollouts/{rollout_id}/rollback",
             summary="Roll a rollout back: every device it changed gets its previous version", responses=RESPONSES)
def rollback(rollout_id: str, db: DB, principal: Operator) -> JSONResponse:
    return _act(control.rollback_rollout, db, rollout_id, principal)
