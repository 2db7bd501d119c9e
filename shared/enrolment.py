"""Enrolment: a device trades a one-time token for its broker identity, the fleet CA and the root of trust.

The token the operator copies to the device says three things: which token
(its id), the secret that proves it (the server keeps only its sha256), and
the sha256 of the fleet CA certificate. The device fetches the CA from the
server without trusting anything, checks it against that fingerprint, and
only then talks to the server over TLS verified by that CA: the way kubeadm's
discovery-token CA hash works. A token works once and expires.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from shared.errors import UserInputError

TOKEN_PREFIX = "efe1"
ENROL_PATH = "/enrol"
CA_PATH = "/enrol/ca.pem"
MAX_CSR_BYTES = 8192
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}\.([a-z0-9]{{8,32}})\.([A-Za-z0-9_-]{{20,64}})\.([A-Za-z0-9_-]{{43}})$")


@dataclass(frozen=True)
class EnrolmentToken:
    token_id: str
    secret: str
    ca_sha256: str  # hex

    @classmethod
    def parse(cls, text: str) -> EnrolmentToken:
        match = _TOKEN.match(text.strip())
        if match is None:
            raise UserInputError(f"not an enrolment token (they look like {TOKEN_PREFIX}.<id>.<secret>.<ca hash>, as "
                                 "'edgefleet device register --token' prints them)")
        token_id, secret, fingerprint = match.groups()
        try:
            ca_sha256 = base64.urlsafe_b64decode(fingerprint + "=").hex()
        except (binascii.Error, ValueError) as exc:
            raise UserInputError("the enrolment token's CA hash is damaged") from exc
        return cls(token_id, secret, ca_sha256)

    def text(self) -> str:
        fingerprint = base64.urlsafe_b64encode(bytes.fromhex(self.ca_sha256)).decode().rstrip("=")
        return f"{TOKEN_PREFIX}.{self.token_id}.{self.secret}.{fingerprint}"


@dataclass(frozen=True)
class EnrolmentRequest:
    v: int
    token: str
    csr: str = ""  # PEM: the device's own key stays on the device; the server signs a client certificate


@dataclass(frozen=True)
class EnrolmentResponse:
    v: int
    device_id: str
    name: str
    profile: str
    broker_url: str
    username: str
    password: str
    ca_pem: str
    root: str  # the fleet's current signed root of trust (JSON): the keys the device trusts from now on
    cert_pem: str = ""  # the client certificate signed from the CSR, when one was sent
