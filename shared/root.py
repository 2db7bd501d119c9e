"""The signed root of trust (TUF's root role): which keys sign what, how many must, until when.

A root lists public keys by id and, for each role (``root``, ``release``,
``director``), the key ids it trusts and a threshold of distinct valid
signatures. It travels as a ``SignedEnvelope`` over canonical JSON, like a
manifest, and is decoded as strictly.

A peer that trusts root N accepts root N+1 only if it carries a threshold of
valid signatures by root N's root keys *and* a threshold by its own root keys
(so a new root key proves it is held), and its version is exactly N+1. A
chain of roots is walked one version at a time; the root it ends on must not
have expired (a freeze attack replays an old, still-signed root). A lower or
equal version is refused and never applied: an equal one is only accepted as
a no-op when it is byte-for-byte the trusted one (every reconnect delivers
the retained chain again).

Every failure has its own message (the attack suite asserts them):

- malformed:        ``root of trust is malformed: …``
- not chained:      ``root v3 does not chain from the trusted root v2: no valid signature by its root keys``
- below threshold:  ``root v3 has 1 valid signature(s) by the trusted root v2's root keys, below its threshold of 2``
                    ``root v3 has 0 valid signature(s) by its own root keys, below its threshold of 1``
- lower or equal:   ``root version 2 is not newer than the trusted version 2``
- skipped:          ``root version 4 skips a version: the trusted root is v2, the next must be v3``
- expired:          ``root v3 expired at 1700000000``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared import PROTOCOL_VERSION
from shared.canonical import loads_strict
from shared.codec import decode
from shared.errors import (
    ChainError,
    ConfigError,
    ExpiredError,
    ProtocolError,
    ReplayError,
    SignatureError,
    TrustError,
)
from shared.messages import SignedEnvelope
from shared.protocol import decode_versioned
from shared.signing import KeyRole, TrustedKeys, key_id, public_key_from_text, valid_signers

ROOT_TYPE = "root"
ROOT_LIFETIME_S = 365 * 24 * 3600
ROLE_NAMES = tuple(role.value for role in KeyRole)


@dataclass(frozen=True)
class RoleKeys:
    keyids: tuple[str, ...]
    threshold: int

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {self.threshold}")
        if len(set(self.keyids)) != len(self.keyids):
            raise ValueError("a role lists a key id twice")
        if self.threshold > len(self.keyids):
            raise ValueError(f"threshold {self.threshold} exceeds the role's {len(self.keyids)} key(s)")


@dataclass(frozen=True)
class Root:
    v: int
    type: str
    version: int
    expires: int
    keys: dict[str, str]  # key id (sha256 of the raw public key) -> base64 raw Ed25519 public key
    roles: dict[str, RoleKeys]

    def __post_init__(self) -> None:
        if self.v != PROTOCOL_VERSION:
            raise ValueError(f"unsupported protocol version {self.v} (this side speaks {PROTOCOL_VERSION})")
        if self.type != ROOT_TYPE:
            raise ValueError(f"type must be {ROOT_TYPE!r}, got {self.type!r}")
        if self.version < 1:
            raise ValueError(f"version must be at least 1, got {self.version}")
        if sorted(self.roles) != sorted(ROLE_NAMES):
            raise ValueError(f"roles must be exactly {', '.join(ROLE_NAMES)}; got {', '.join(sorted(self.roles))}")
        for keyid, text in self.keys.items():
            try:
                actual = key_id(public_key_from_text(text))
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
            if actual != keyid:  # else one key could count twice towards a threshold under two ids
                raise ValueError(f"key id {keyid} does not match its key ({actual})")
        for name, role in self.roles.items():
            unknown = [k for k in role.keyids if k not in self.keys]
            if unknown:
                raise ValueError(f"role {name} names unlisted key(s) {', '.join(unknown)}")

    def role(self, role: KeyRole) -> RoleKeys:
        return self.roles[role.value]

    def public_keys(self, role: KeyRole) -> dict[str, Ed25519PublicKey]:
        return {k: public_key_from_text(self.keys[k]) for k in self.role(role).keyids}

    def trusted_keys(self) -> TrustedKeys:
        """What manifests, directives and the next root are verified with."""
        return TrustedKeys(
            keys={role: self.public_keys(role) for role in KeyRole},
            thresholds={role: self.role(role).threshold for role in KeyRole},
        )

    def roles_of(self, keyid: str) -> list[str]:
        return [name for name in ROLE_NAMES if keyid in self.roles[name].keyids]


def decode_root(envelope: SignedEnvelope) -> Root:
    try:
        return decode_versioned(Root, envelope.signed)
    except ProtocolError as exc:
        raise SignatureError(f"root of trust is malformed: {exc}") from exc


def _check_own_threshold(envelope: SignedEnvelope, root: Root) -> None:
    own = valid_signers(envelope, root.public_keys(KeyRole.ROOT), f"root v{root.version}")
    threshold = root.role(KeyRole.ROOT).threshold
    if len(own) < threshold:
        raise SignatureError(
            f"root v{root.version} has {len(own)} valid signature(s) by its own root keys, "
            f"below its threshold of {threshold}"
        )


def verify_root_self(envelope: SignedEnvelope) -> Root:
    """A root trusted by how it was installed (the agent's root file, saved state, the server's history):
    well formed and signed by a threshold of its own root keys. Its age is not checked here."""
    root = decode_root(envelope)
    _check_own_threshold(envelope, root)
    return root


def verify_root_update(trusted: Root, envelope: SignedEnvelope) -> Root:
    """One step: ``envelope`` as the successor of ``trusted`` (version + 1, signed by both root key sets)."""
    new = decode_root(envelope)
    if new.version <= trusted.version:
        raise ReplayError(f"root version {new.version} is not newer than the trusted version {trusted.version}")
    if new.version != trusted.version + 1:
        raise ChainError(
            f"root version {new.version} skips a version: the trusted root is v{trusted.version}, "
            f"the next must be v{trusted.version + 1}"
        )
    old = valid_signers(envelope, trusted.public_keys(KeyRole.ROOT), f"root v{new.version}")
    if not old:
        raise ChainError(
            f"root v{new.version} does not chain from the trusted root v{trusted.version}: "
            "no valid signature by its root keys"
        )
    threshold = trusted.role(KeyRole.ROOT).threshold
    if len(old) < threshold:
        raise SignatureError(
            f"root v{new.version} has {len(old)} valid signature(s) by the trusted root v{trusted.version}'s "
            f"root keys, below its threshold of {threshold}"
        )
    _check_own_threshold(envelope, new)
    return new


@dataclass(frozen=True)
class RootUpdate:
    root: Root
    envelope: SignedEnvelope


def update_root(
    trusted: Root, trusted_envelope: SignedEnvelope, chain: Sequence[SignedEnvelope], *, now: float
) -> RootUpdate | None:
    """Walk ``chain`` (every version, oldest first) from ``trusted``; the newest root it proves, or None
    when the chain holds nothing newer (its newest is the trusted root itself). Raises TrustError."""
    if not chain:
        raise SignatureError("root of trust is malformed: the chain is empty")
    decoded = [(decode_root(envelope), envelope) for envelope in chain]
    newest, newest_envelope = max(decoded, key=lambda pair: pair[0].version)
    if newest.version <= trusted.version:
        if newest.version == trusted.version and newest_envelope.signed == trusted_envelope.signed:
            return None  # what we trust already (the retained chain, delivered again)
        raise ReplayError(f"root version {newest.version} is not newer than the trusted version {trusted.version}")
    current = trusted
    for root, envelope in sorted(decoded, key=lambda pair: pair[0].version):
        if root.version <= trusted.version:
            continue  # history this side already walked
        current = verify_root_update(current, envelope)
        newest_envelope = envelope
    if current.expires <= now:
        raise ExpiredError(f"root v{current.version} expired at {current.expires}")
    return RootUpdate(current, newest_envelope)


def root_from_json(data: bytes) -> tuple[Root, SignedEnvelope]:
    """A signed root as stored in a file (the envelope's JSON), checked against its own root keys.
    Raises ProtocolError (not a signed envelope) or TrustError."""
    try:
        envelope = decode(SignedEnvelope, loads_strict(data))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    return verify_root_self(envelope), envelope


def read_root_file(path: Path) -> tuple[Root, SignedEnvelope]:
    """The root of trust an agent starts from (``[keys] root_file``): every problem is one ConfigError."""
    try:
        return root_from_json(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the root of trust {path}: {exc.strerror or exc}") from exc
    except (ProtocolError, TrustError) as exc:
        raise ConfigError(f"{path} is not a signed root of trust: {exc}") from exc
