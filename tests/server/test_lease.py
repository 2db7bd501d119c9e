"""The engine lease (``server/lease.py``) on SQLite and on a real PostgreSQL: taking, renewing, expiry, release,
and fencing (a replica that lost the lease decides nothing, and on PostgreSQL a takeover waits for the holder's
decision to commit)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.db import Database, Session, open_database
from server.db.leases import database_clock, lease_holder
from server.lease import EngineLease
from server.rollouts import RolloutEngine
from tests.pg import PostgresServer

TTL_S = 1.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"
    return request.getfixturevalue("postgres").create_database()  # type: ignore[no-any-return]


@pytest.fixture
def databases(url: str) -> Iterator[tuple[Database, Database]]:
    """Two Database objects on one database, as two replicas have."""
    first, second = open_database(url), open_database(url)
    first.upgrade()
    yield first, second
    first.close()
    second.close()


def renewed(lease: EngineLease) -> bool:
    with lease.db.session() as session:
        held = lease.renew(session)
    lease.settle(held)
    return held


def holder(db: Database) -> tuple[str, float] | None:
    with db.session() as session:
        return lease_holder(session, "engine")


class CountingEngine(RolloutEngine):
    """The real tick (lease renewal, transaction, publishing) around a decide that only counts."""

    def __init__(self, db: Database, lease: EngineLease, *, fail: bool = False) -> None:
        super().__init__(db, keys=None, publish=lambda *args: None, lease=lease)  # type: ignore[arg-type]
        self.decided = 0
        self.fail = fail

    def decide(self, session: Session, now: float) -> None:
        self.decided += 1
        if self.fail:
            raise RuntimeError("a bug in a tick")

    def outgoing(self, session: Session, now: float) -> tuple[list[Any], list[str]]:
        return [], []


def test_one_replica_holds_the_lease_until_it_expires(databases: tuple[Database, Database]) -> None:
    a, b = EngineLease(databases[0], "a", ttl_s=TTL_S), EngineLease(databases[1], "b", ttl_s=TTL_S)

    assert renewed(a) and not renewed(b)
    assert renewed(a) and not renewed(b)  # renewing keeps it
    found = holder(databases[1])
    assert found is not None and found[0] == a.holder and 0 < found[1] <= TTL_S

    time.sleep(TTL_S + 0.2)  # a stops renewing, as a dead replica does

    assert renewed(b) and b.held
    assert not renewed(a) and not a.held  # a stale holder finds out at its next renewal


def test_a_clean_stop_hands_the_lease_over_at_once(databases: tuple[Database, Database]) -> None:
    a, b = EngineLease(databases[0], "a", ttl_s=60), EngineLease(databases[1], "b", ttl_s=60)
    assert renewed(a) and not renewed(b)

    a.release()

    assert renewed(b)


def test_the_lease_runs_on_the_databases_clock(databases: tuple[Database, Database]) -> None:
    with databases[0].session() as session:
        assert abs(database_clock(session) - time.time()) < 5


def test_two_processes_of_one_replica_name_do_not_both_lead(databases: tuple[Database, Database]) -> None:
    first, second = EngineLease(databases[0], "a", ttl_s=60), EngineLease(databases[1], "a", ttl_s=60)

    assert renewed(first) and not renewed(second)


def test_a_replica_without_the_lease_decides_nothing(databases: tuple[Database, Database]) -> None:
    a, b = EngineLease(databases[0], "a", ttl_s=60), EngineLease(databases[1], "b", ttl_s=60)
    leader, follower = CountingEngine(databases[0], a), CountingEngine(databases[1], b)

    leader.tick()
    follower.tick()
    follower.tick()

    assert (leader.decided, follower.decided) == (1, 0)
    assert a.held and not b.held


def test_a_tick_that_fails_renews_nothing(databases: tuple[Database, Database]) -> None:
    """The renewal is part of the tick's transaction: when the decision rolls back, so does the lease."""
    a, b = EngineLease(databases[0], "a", ttl_s=60), EngineLease(databases[1], "b", ttl_s=60)
    broken = CountingEngine(databases[0], a, fail=True)

    with pytest.raises(RuntimeError):
        broken.tick()

    assert not a.held
    assert renewed(b)  # a never held it: the row still says nobody does


def test_on_postgresql_a_takeover_waits_for_the_holders_decision_to_commit(
    postgres: PostgresServer,
) -> None:
    """The holder renews, then takes longer than its TTL to decide; a contender that tries meanwhile (the
    lease looks expired) waits on the row lock, and takes it only once the decision committed."""
    url = postgres.create_database()
    first, second = open_database(url), open_database(url)
    first.upgrade()
    try:
        a, b = EngineLease(first, "a", ttl_s=0.2), EngineLease(second, "b", ttl_s=0.2)
        took: list[float] = []
        committed: list[float] = []
        with first.session() as session:
            assert a.renew(session)
            session.flush()
            contender = threading.Thread(target=lambda: took.append(time.monotonic()) if renewed(b) else None)
            time.sleep(0.4)  # expired on the clock, but the holder's transaction is still deciding
            contender.start()
            time.sleep(0.5)
            assert not took, "the contender took the lease while the holder's decision was open"
            committed.append(time.monotonic())
        contender.join(10)
        assert took and took[0] >= committed[0]
    finally:
        first.close()
        second.close()
