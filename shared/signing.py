"""Ed25519 signing and verification of manifests and directives.

Two roles, as in Uptane: the offline-able **release** key signs artifact
manifests, the online **director** key signs per-device directives; a third,
**root**, signs the root of trust that lists the keys of all three
(``shared/root.py``). A verifier holds several keys per role (rotation), may
require a threshold of distinct valid signatures, and fails closed when it
has none. Signatures are checked over the canonical JSON of ``signed``
*before* the content is parsed.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.canonical import canonical_digest, canonical_json
from shared.errors import ConfigError, ExpiredError, ProtocolError, ReplayError, SignatureError, TargetError
from shared.messages import Directive, Manifest, MeasureOrder, Signature, SignedEnvelope
from shared.protocol import decode_versioned, encode_versioned


class KeyRole(enum.Enum):
    ROOT = "root"
    RELEASE = "release"
    DIRECTOR = "director"


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_text(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"not an Ed25519 public key: {text!r}") from exc


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("private key is not Ed25519")
    return key


def _signature(message: bytes, key: Ed25519PrivateKey) -> Signature:
    return Signature(keyid=key_id(key.public_key()), sig=base64.b64encode(key.sign(message)).decode("ascii"))


def sign_envelope(payload: Any, key: Ed25519PrivateKey, *more: Ed25519PrivateKey) -> SignedEnvelope:
    """``payload`` signed by ``key`` (and ``more``: a root is signed by its old and new root keys); a key
    given twice signs once."""
    signed = encode_versioned(payload)  # a newer minor says so, under the signature
    return add_signatures(SignedEnvelope(signed=signed, signatures=()), (key, *more))


def add_signatures(envelope: SignedEnvelope, keys: Sequence[Ed25519PrivateKey]) -> SignedEnvelope:
    """``envelope`` with a signature by each of ``keys`` it does not carry yet (threshold signing, offline)."""
    message = canonical_json(envelope.signed)
    signatures = list(envelope.signatures)
    for key in keys:
        if key_id(key.public_key()) not in {s.keyid for s in signatures}:
            signatures.append(_signature(message, key))
    return SignedEnvelope(signed=envelope.signed, signatures=tuple(signatures))


def valid_signers(envelope: SignedEnvelope, keys: Mapping[str, Ed25519PublicKey], what: str) -> set[str]:
    """The distinct ids of ``keys`` whose signature on ``envelope`` verifies (a threshold counts these)."""
    try:
        message = canonical_json(envelope.signed)
    except ProtocolError as exc:
        raise SignatureError(f"{what} cannot be canonicalised: {exc}") from exc
    signers: set[str] = set()
    for signature in envelope.signatures:
        key = keys.get(signature.keyid)
        if key is None or signature.keyid in signers:
            continue
        try:
            key.verify(base64.b64decode(signature.sig, validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        signers.add(signature.keyid)
    return signers


def envelope_digest(envelope: SignedEnvelope) -> str:
    """What a directive pins: the digest of the signed part of a manifest."""
    return canonical_digest(envelope.signed)


@dataclass(frozen=True)
class TrustedKeys:
    """Pinned public keys per role, and how many distinct valid signatures each role needs (default 1)."""

    keys: Mapping[KeyRole, Mapping[str, Ed25519PublicKey]] = field(default_factory=dict)
    thresholds: Mapping[KeyRole, int] = field(default_factory=dict)

    def threshold(self, role: KeyRole) -> int:
        return max(1, self.thresholds.get(role, 1))

    @classmethod
    def from_text(cls, by_role: Mapping[KeyRole, list[str]]) -> TrustedKeys:
        keys: dict[KeyRole, dict[str, Ed25519PublicKey]] = {}
        for role, texts in by_role.items():
            parsed = [public_key_from_text(t) for t in texts]
            keys[role] = {key_id(k): k for k in parsed}
        return cls(keys)

    def verify(self, envelope: SignedEnvelope, role: KeyRole) -> dict[str, Any]:
        pinned = self.keys.get(role) or {}
        if not pinned:
            raise SignatureError(f"no {role.value} key is pinned: refusing to trust anything")
        if not envelope.signatures:
            raise SignatureError(f"{role.value} metadata carries no signature")
        signers = valid_signers(envelope, pinned, f"{role.value} metadata")
        if not signers:
            raise SignatureError(f"no valid signature by a pinned {role.value} key")
        threshold = self.threshold(role)
        if len(signers) < threshold:
            raise SignatureError(
                f"{len(signers)} valid signature(s) by pinned {role.value} keys, below the threshold of {threshold}"
            )
        return envelope.signed


def verify_manifest(
    envelope: SignedEnvelope,
    trusted: TrustedKeys,
    *,
    now: float,
    min_release_counter: int = 0,
    profile: str | None = None,
) -> Manifest:
    """``profile``: the verifying device's own; a release built for another is refused
    (Uptane's hardware-identifier check: the director key alone cannot cross profiles)."""
    signed = trusted.verify(envelope, KeyRole.RELEASE)
    try:
        manifest = decode_versioned(Manifest, signed)
    except ProtocolError as exc:
        raise SignatureError(f"signed manifest is malformed: {exc}") from exc
    if profile is not None and manifest.profile != profile:
        raise TargetError(
            f"release {manifest.model} v{manifest.version} is built for profile {manifest.profile}, "
            f"this device is {profile}"
        )
    if manifest.expires <= now:
        raise ExpiredError(f"manifest for {manifest.model} v{manifest.version} expired at {manifest.expires}")
    if manifest.release_counter < min_release_counter:
        raise ReplayError(
            f"release counter {manifest.release_counter} is lower than the trusted {min_release_counter}"
        )
    return manifest


def verify_directive(
    envelope: SignedEnvelope,
    trusted: TrustedKeys,
    *,
    now: float,
    device_id: str,
    manifest_envelope: SignedEnvelope,
    min_seq: int = 0,
) -> Directive:
    directive = _verify_director_document(envelope, trusted, Directive, "directive", now=now, device_id=device_id,
                                          manifest_envelope=manifest_envelope, name=lambda d: d.deployment_id)
    if directive.seq < min_seq:
        raise ReplayError(f"directive sequence {directive.seq} is lower than the trusted {min_seq}")
    return directive


def verify_measure_order(
    envelope: SignedEnvelope, trusted: TrustedKeys, *, now: float, device_id: str, manifest_envelope: SignedEnvelope,
) -> MeasureOrder:
    """A benchmark-only trial order: director-signed, for this device, unexpired, pinning this manifest."""
    return _verify_director_document(envelope, trusted, MeasureOrder, "measure order", now=now, device_id=device_id,
                                     manifest_envelope=manifest_envelope, name=lambda o: o.measurement_id)


_DirectorSigned = TypeVar("_DirectorSigned", Directive, MeasureOrder)


def _verify_director_document(
    envelope: SignedEnvelope, trusted: TrustedKeys, cls: type[_DirectorSigned], what: str, *, now: float,
    device_id: str, manifest_envelope: SignedEnvelope, name: Callable[[_DirectorSigned], str],
) -> _DirectorSigned:
    """What a directive and a measure order share: the director's signature, a well-formed document, this
    device, not expired, and the manifest it pins."""
    signed = trusted.verify(envelope, KeyRole.DIRECTOR)
    try:
        document = decode_versioned(cls, signed)
    except ProtocolError as exc:
        raise SignatureError(f"signed {what} is malformed: {exc}") from exc
    if document.device_id != device_id:
        raise TargetError(f"{what} is for device {document.device_id}, not {device_id}")
    if document.expires <= now:
        raise ExpiredError(f"{what} {name(document)} expired at {document.expires}")
    if document.manifest_sha256 != envelope_digest(manifest_envelope):
        raise SignatureError(f"{what} does not pin this manifest")
    return document
