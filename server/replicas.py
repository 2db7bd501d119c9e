"""Server replicas: names, and what each name gives a replica (its broker identity and MQTT session).

Several ``edgefleet server`` processes on one PostgreSQL database and one
broker are replicas. Each has a name (``--replica``, default ``main``: a
single server keeps the identity it always had) that it registers in the
database before it connects, so the broker's password file and ACL list it
(``server/broker_identities.py``).
"""

from __future__ import annotations

import re

from shared.errors import UserInputError

DEFAULT_REPLICA = "main"
SERVER_USERNAME = "edgefleet-server"  # the default replica's broker identity
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
# A replica's persistent MQTT session, with several replicas: short, because Mosquitto keeps routing a shared
# subscription's share of the reports to a member's offline session until the session expires; agents resend
# anything unacknowledged (30 s), so a dead replica's share is lost for at most this long plus that.
REPLICA_SESSION_EXPIRY_S = 15


def check_replica_name(name: str) -> str:
    """``name`` if it can name a replica (it goes into a broker username and a file name)."""
    if not _NAME.fullmatch(name):
        raise UserInputError(f"a replica name is 1-32 of a-z, 0-9 and '-', not starting or ending with '-'; "
                             f"got {name!r}")
    return name


def broker_username(replica: str) -> str:
    """The replica's broker identity: ``edgefleet-server`` for the default one, ``edgefleet-server-NAME``
    otherwise (the fleet broker binds a session to its username, so replicas need their own)."""
    return SERVER_USERNAME if replica == DEFAULT_REPLICA else f"{SERVER_USERNAME}-{replica}"
