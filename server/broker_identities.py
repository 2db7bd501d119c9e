"""Devices' broker identities: issued at registration or enrolment, revoked at removal.

The database is the truth (the hash of each live device's password); the
broker's password file is regenerated from it after every change, and the
running broker re-reads it at once (``server/broker_setup.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from server.broker_setup import BrokerLayout, BrokerSettings, new_secret, password_hash, write_identities
from server.db import Database, queries
from server.db.replica_registry import replica_names
from server.replicas import broker_username
from server.tls import create_client_certificate
from shared.agent_toml import BrokerIdentity
from shared.errors import NotFoundError
from shared.files import atomic_write_bytes, write_private

CA_FILE = "ca.pem"  # the fleet CA beside agent.toml, the same file for every device of the fleet


def new_identity() -> tuple[str, str]:
    """A fresh broker password and the hash the server keeps of it."""
    password = new_secret()
    return password, password_hash(password)


def sync_broker(db: Database, layout: BrokerLayout) -> bool:
    """Write the broker's password file and ACL from the database (devices and server replicas), if it says
    anything else (a data directory without a broker: nothing to do). Returns whether it changed. Every
    command that changes an identity calls it, and a replica as it starts; the running leader calls it
    periodically too, so a command killed between its commit and this still takes effect within seconds."""
    if not layout.exists():
        return False
    with db.reading() as session:
        identities = queries.broker_secrets(session)
    return write_identities(layout, identities, [broker_username(name) for name in replica_names(db)])


def reissue_password(db: Database, layout: BrokerLayout, device_id: str) -> str:
    """A new password for a live device (the old one stops working at once); returns it."""
    password, hashed = new_identity()
    with db.session() as session:
        device = queries.live_device(session, device_id)
        if device is None:
            raise NotFoundError(f"no registered device with id {device_id!r}")
        device.broker_secret = hashed
    sync_broker(db, layout)
    return password


def write_device_files(layout: BrokerLayout, device_id: str, name: str, password: str, url: str,
                       directory: Path) -> BrokerIdentity:
    """The ``[broker]`` table of a device's config, writing beside it the CA it pins (``mqtts://``) and,
    with client certificates on, its key and certificate (0600)."""
    settings = BrokerSettings.load(layout)
    identity = BrokerIdentity(url, username=device_id, password=password)
    if not url.startswith("mqtts:"):
        return identity
    files = layout.tls
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_copy = files.ca_cert.read_bytes(), directory / CA_FILE
    if not (ca_copy.exists() and ca_copy.read_bytes() == ca):  # configs written together share one copy
        atomic_write_bytes(ca_copy, ca)
    identity = replace(identity, ca_file=CA_FILE)
    if settings.client_certificates:
        cert, key = create_client_certificate(files, device_id)
        write_private(directory / f"{name}-key.pem", key)
        atomic_write_bytes(directory / f"{name}-cert.pem", cert)
        identity = replace(identity, cert_file=f"{name}-cert.pem", key_file=f"{name}-key.pem")
    return identity
