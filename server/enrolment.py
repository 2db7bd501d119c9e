"""Enrolment tokens: made by ``device register --token``, redeemed once by ``edgefleet agent enrol``.

The server keeps only a token's sha256. Redeeming checks it in constant time,
refuses a used, expired or unknown token (or one whose device was removed),
marks it used in one conditional UPDATE (two devices racing with one token:
exactly one wins), and only then issues the device's broker identity: a new
password, whose hash replaces any earlier one, so a copied config stops
working. A CSR is signed into a client certificate naming the device's id,
whatever subject it asked for. Everything is in the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from server import audit
from server.broker_identities import new_identity, sync_broker
from server.broker_setup import BrokerLayout, BrokerSettings
from server.db import Database, queries
from server.db.models import EnrolmentToken as TokenRecord
from server.roots import RootStore
from server.tls import certificate_sha256, sign_client_csr
from shared import PROTOCOL_VERSION
from shared.canonical import canonical_json
from shared.codec import encode
from shared.enrolment import MAX_CSR_BYTES, EnrolmentRequest, EnrolmentResponse, EnrolmentToken
from shared.errors import AccessDeniedError, ConfigError, EdgefleetError, UserInputError

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 24 * 3600


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def create_token(db: Database, layout: BrokerLayout, device_id: str, *, ttl_s: float = DEFAULT_TTL_S,
                 actor: str | None = None) -> tuple[str, datetime]:
    """A new one-time token for the device; returns its text (shown once) and when it expires."""
    if not layout.exists():
        raise ConfigError("this data directory has no broker set up: run 'edgefleet init' first")
    if not ttl_s > 0:
        raise UserInputError(f"--token-ttl must be positive, got {ttl_s:g} s")
    token = EnrolmentToken(secrets.token_hex(6), secrets.token_urlsafe(24),
                           certificate_sha256(layout.tls.ca_cert.read_bytes()))
    expires = datetime.now(timezone.utc) + timedelta(seconds=ttl_s)
    with db.session() as session:
        device = queries.live_device(session, device_id)
        if device is None:
            raise UserInputError(f"no registered device with id {device_id!r}")
        session.add(TokenRecord(id=token.token_id, device_id=device_id, token_sha256=_digest(token.secret),
                                expires_at=expires))
        audit.record(session, "device.enrolment_token", f"enrolment token {token.token_id} for {device.name} "
                     f"({device.id}), valid until {expires:%Y-%m-%d %H:%M:%S} UTC", actor=actor or audit.operator(),
                     device_id=device.id, data={"token": token.token_id, "expires": expires.isoformat()})
    return token.text(), expires


@dataclass(frozen=True)
class Enrolment:
    """What redeeming needs from the data directory; the HTTP route holds one."""

    db: Database
    layout: BrokerLayout
    keys_dir: Path  # the root of trust the device will start from: RootStore(keys_dir).current()

    def ca_pem(self) -> bytes:
        return self.layout.tls.ca_cert.read_bytes()

    def redeem(self, request: EnrolmentRequest, client: str) -> EnrolmentResponse:
        token = EnrolmentToken.parse(request.token)
        if len(request.csr) > MAX_CSR_BYTES:
            raise UserInputError(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
        now = datetime.now(timezone.utc)
        with self.db.reading() as session:
            record = session.get(TokenRecord, token.token_id)
            known = record is not None and hmac.compare_digest(record.token_sha256, _digest(token.secret))
            if not known or record is None:
                raise AccessDeniedError("unknown enrolment token")
            if record.used_at is not None:
                raise AccessDeniedError(f"this enrolment token was already used, at "
                                        f"{_aware(record.used_at):%Y-%m-%d %H:%M:%S} UTC")
            if _aware(record.expires_at) <= now:
                raise AccessDeniedError(f"this enrolment token expired at {_aware(record.expires_at):%Y-%m-%d %H:%M:%S} UTC")
            device = queries.live_device(session, record.device_id)
            if device is None:
                raise AccessDeniedError("the device this token was made for has been removed")
            device_id, name, profile = device.id, device.name, device.profile_name
        # Everything the answer needs is made before the token is used up: a bad CSR (the caller's mistake) or
        # a missing root must not burn it.
        cert = sign_client_csr(self.layout.tls, request.csr.encode(), device_id).decode() if request.csr else ""
        _, root = RootStore(self.keys_dir).current()
        broker_url = BrokerSettings.load(self.layout).device_url()
        password, hashed = new_identity()
        with self.db.session() as session:
            if not queries.claim_enrolment_token(session, token.token_id, now, client):
                raise AccessDeniedError("this enrolment token was already used")
            device = queries.live_device(session, device_id)
            if device is None:
                raise AccessDeniedError("the device this token was made for has been removed")
            device.broker_secret = hashed
            audit.record(session, "device.enrolled", f"{name} ({device_id}) enrolled from {client} with token "
                         f"{token.token_id}{' and a client certificate' if cert else ''}",
                         actor=f"device {name}", device_id=device_id, data={"token": token.token_id, "from": client})
        try:
            sync_broker(self.db, self.layout)  # the broker knows the new identity from now on
        except EdgefleetError as exc:  # committed: the running server's reconciliation writes it within seconds
            logger.error("enrolled %s, but could not update the broker's identities yet: %s", name, exc)
        return EnrolmentResponse(
            v=PROTOCOL_VERSION, device_id=device_id, name=name, profile=profile,
            broker_url=broker_url, username=device_id, password=password,
            ca_pem=self.ca_pem().decode(), root=canonical_json(encode(root)).decode(), cert_pem=cert,
        )
