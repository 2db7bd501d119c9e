"""Starting a rollout in unit tests the way a running server would take it up."""

from __future__ import annotations

import time
from typing import Any

from server.rollouts import RolloutEngine, RolloutPolicy, start_rollout
from server.selection import Selection
from server.setup import Workspace

ALL_AT_ONCE = RolloutPolicy(waves=("100%",))


def take_up(workspace: Workspace, now: float | None = None) -> None:
    """What the server's next engine tick decides (deployments created, directives not yet published)."""
    engine = RolloutEngine(workspace.db, workspace.keys(), blobs=workspace.blobs)
    with workspace.db.session() as session:
        engine.decide(session, time.time() if now is None else now)


def start_all_at_once(workspace: Workspace, *names: str, ref: str = "digits", **policy: Any) -> str:
    """A one-wave rollout of ``ref`` to ``names``, its deployments created; returns its id."""
    rollout_id = start_rollout(workspace.db, workspace.blobs, workspace.keys(), ref, Selection(devices=names),
                               RolloutPolicy(**{"waves": ("100%",), **policy}))
    take_up(workspace)
    return rollout_id
