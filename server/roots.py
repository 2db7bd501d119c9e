"""The signed root of trust on the server: every version, kept in ``DATA_DIR/keys/root/N.json``.

Version 1 is written by ``edgefleet init``; ``edgefleet keys rotate`` and
``keys revoke`` add the next (``server/key_rotation.py``). A version is only
written after it verified as the successor of the current one, with mode
0600 and never over an existing file. The running server publishes the whole
chain, retained, on ``ef/v1/root`` and notices a new version by the
directory's modification time (one ``stat`` per tick).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared import PROTOCOL_VERSION
from shared.canonical import canonical_json, loads_strict
from shared.codec import decode, encode
from shared.errors import ConfigError, ProtocolError, TrustError, UserInputError
from shared.files import private_dir, write_private
from shared.messages import MAX_ROOT_PAYLOAD, RootChain, SignedEnvelope, encode_payload
from shared.root import (
    ROOT_LIFETIME_S,
    ROOT_TYPE,
    RoleKeys,
    Root,
    root_from_json,
    verify_root_self,
    verify_root_update,
)
from shared.signing import KeyRole, key_id, public_key_text, sign_envelope


def make_root(
    version: int, role_keys: Mapping[KeyRole, Sequence[Ed25519PublicKey]], *,
    thresholds: Mapping[KeyRole, int] | None = None, now: float | None = None,
) -> Root:
    """A root listing ``role_keys`` (threshold 1 unless ``thresholds`` says otherwise), valid for a year."""
    now = time.time() if now is None else now
    keys = {key_id(k): public_key_text(k) for listed in role_keys.values() for k in listed}
    return Root(
        v=PROTOCOL_VERSION, type=ROOT_TYPE, version=version, expires=int(now) + ROOT_LIFETIME_S, keys=keys,
        roles={
            role.value: RoleKeys(tuple(key_id(k) for k in role_keys[role]), (thresholds or {}).get(role, 1))
            for role in KeyRole
        },
    )


def sign_root(root: Root, signers: Sequence[Ed25519PrivateKey]) -> SignedEnvelope:
    return sign_envelope(root, *signers)


class RootStore:
    def __init__(self, keys_dir: Path) -> None:
        self.dir = keys_dir / "root"

    def path(self, version: int) -> Path:
        return self.dir / f"{version}.json"

    def versions(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit() and n[0] != "0")

    def exists(self) -> bool:
        return bool(self.versions())

    def stamp(self) -> int:
        """Changes whenever a version is added: a running server's cheap check."""
        try:
            return os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return 0

    def envelope(self, version: int) -> SignedEnvelope:
        path = self.path(version)
        try:
            return decode(SignedEnvelope, loads_strict(path.read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except (ValueError, RecursionError, ProtocolError) as exc:
            raise ConfigError(f"{path} is not a signed root: {exc}") from exc

    def current(self) -> tuple[Root, SignedEnvelope]:
        versions = self.versions()
        if not versions:
            raise ConfigError(
                f"no root of trust in {self.dir}: run 'edgefleet init --data-dir {self.dir.parent.parent}' "
                "(it keeps the keys that are there)"
            )
        envelope = self.envelope(versions[-1])
        try:
            return verify_root_self(envelope), envelope
        except TrustError as exc:
            raise ConfigError(f"{self.path(versions[-1])}: {exc}") from exc

    def chain(self) -> list[SignedEnvelope]:
        return [self.envelope(v) for v in self.versions()]

    def save(self, envelope: SignedEnvelope) -> Root:
        """Add the next version; it must verify as the successor of the current one (or as v1, alone)."""
        try:
            if self.exists():
                root = verify_root_update(self.current()[0], envelope)
            else:
                root = verify_root_self(envelope)
                if root.version != 1:
                    raise ConfigError(f"the first root must be version 1, not {root.version}")
        except TrustError as exc:
            raise ConfigError(f"cannot add this root: {exc}") from exc
        private_dir(self.dir)
        write_private(self.path(root.version), canonical_json(encode(envelope)), exclusive=True)
        return root


ROOT_FILE = "root.json"  # an agent's initial root of trust, beside its agent.toml ([keys] root_file)


def write_root_file(store: RootStore, path: Path) -> Root:
    """The current root, for an agent's ``root_file``. Configs written to one directory share it: an
    existing file is replaced only by a newer root of the same fleet (one in this server's history)."""
    root, envelope = store.current()
    if path.exists():
        try:
            existing, existing_envelope = root_from_json(path.read_bytes())
        except (OSError, ProtocolError, TrustError) as exc:
            raise UserInputError(f"{path} exists and is not a root of trust ({exc}): move it away or write the "
                                 "config to another directory") from exc
        if existing.version not in store.versions() or store.envelope(existing.version) != existing_envelope:
            raise UserInputError(f"{path} holds another fleet's root of trust: write the config to another directory")
        if existing.version == root.version:
            return root
    write_private(path, canonical_json(encode(envelope)))
    return root


def chain_payload(chain: Sequence[SignedEnvelope]) -> bytes:
    """The ``ef/v1/root`` message: the whole chain, or its newest versions when all would exceed the limit
    (an agent further behind than that needs its root file replaced)."""
    roots = list(chain)
    while True:
        payload = encode_payload(RootChain(v=PROTOCOL_VERSION, roots=tuple(roots)))
        if len(payload) <= MAX_ROOT_PAYLOAD or len(roots) == 1:
            return payload
        roots.pop(0)
