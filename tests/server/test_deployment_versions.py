"""Two writers changing one deployment at once (a replica applying the device's report while the leader's
engine cancels it): the later commit is refused and retried on fresh data, never a silent overwrite.

On SQLite the write lock already serialises them; on PostgreSQL (READ COMMITTED) only the deployments'
``row_version`` (optimistic locking) stands between the two."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from server.db.models import Deployment
from server.devices import register_device
from server.setup import Workspace
from shared.errors import StorageError
from tests.server.rollout_helpers import start_all_at_once


# PostgreSQL only: on SQLite, BEGIN IMMEDIATE lets one writer read at a time, so there is no race to lose.
@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
def test_the_later_of_two_concurrent_changes_to_a_deployment_is_refused_not_lost(workspace: Workspace) -> None:
    register_device(workspace.db, "cam-1", "x86-64")
    rollout_id = start_all_at_once(workspace, "cam-1")
    with workspace.db.session() as session:
        (deployment_id,) = session.scalars(select(Deployment.id).where(Deployment.rollout_id == rollout_id)).all()
    both_read = threading.Barrier(2)
    first_committed = threading.Event()

    def change(state: str, reason: str, first: bool) -> str:
        try:
            with workspace.db.session() as session:
                deployment = session.get(Deployment, deployment_id)
                assert deployment is not None and deployment.state == "pending"
                both_read.wait(timeout=10)
                if not first:
                    assert first_committed.wait(timeout=10)
                deployment.state, deployment.reason = state, reason
            return "stored"
        except StorageError as exc:
            return f"refused: {exc}"
        finally:
            if first:
                first_committed.set()

    with ThreadPoolExecutor(2) as pool:
        device_said = pool.submit(change, "committed", "", True)
        engine_said = pool.submit(change, "cancelled", "the rollout was rolled back", False)
        assert device_said.result() == "stored"
        assert engine_said.result().startswith("refused: ") and "changed concurrently" in engine_said.result()
    with workspace.db.session() as session:
        deployment = session.get(Deployment, deployment_id)
        assert deployment is not None
        assert (deployment.state, deployment.row_version) == ("committed", 2)
