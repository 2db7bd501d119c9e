"""The rollout engine's lease: exactly one server replica leads at a time.

The leader runs the rollout engine and the duties that must happen once per
fleet, not once per replica (chunk serving, latency compaction, broker
identities, the root of trust). It renews the lease inside each engine tick's
transaction (``RolloutEngine.tick``): a replica whose lease was taken over
finds that out in the very transaction that would have decided something, and
decides nothing. A replica that dies stops renewing, and another takes the
lease once it expires (``TTL_S``); a clean stop releases it at once.

The holder is this process (the replica's name and a random token), not the
replica's name: two processes started by mistake under one name must not
both lead.
"""

from __future__ import annotations

import logging
import secrets

from server.db import Database, Session
from server.db.leases import expire_lease, release_lease, renew_lease

logger = logging.getLogger(__name__)

ENGINE = "engine"
# Renewed every tick (0.5 s): a holder that stopped for this long is dead, or as good as; a takeover
# waits at most this long.
TTL_S = 10.0


class EngineLease:
    def __init__(self, db: Database, replica: str, *, name: str = ENGINE, ttl_s: float = TTL_S) -> None:
        self.db = db
        self.name = name
        self.ttl_s = ttl_s
        self.holder = f"{replica}:{secrets.token_hex(4)}"
        self.held = False  # as of the last renewal that committed

    def renew(self, session: Session) -> bool:
        """Take or extend the lease in ``session``'s transaction; the caller commits (or rolls back, and then
        holds nothing). Does not change ``held``: the caller says what committed (``settle``)."""
        return renew_lease(session, self.name, self.holder, self.ttl_s)

    def settle(self, held: bool) -> None:
        """Record the outcome of a committed renewal, logging a change of leadership."""
        if held != self.held:
            if held:
                logger.info("this replica (%s) took the %s lease", self.holder, self.name)
            else:
                logger.warning("this replica (%s) does not hold the %s lease (any more)", self.holder, self.name)
        self.held = held

    def release(self) -> None:
        """Give the lease up (a clean stop): another replica takes it at its next tick."""
        if not self.held:
            return
        self.held = False
        with self.db.session() as session:
            release_lease(session, self.name, self.holder)
        logger.info("released the %s lease", self.name)

    def free_dead_holder(self) -> None:
        """The single-server lock proves no other server runs: a holder left behind by a killed server is
        dead, so this one need not wait for its lease to expire."""
        with self.db.session() as session:
            expire_lease(session, self.name)
