"""``edgefleet keys rotate`` and ``keys revoke``: each change is the next version of the root of trust.

The new root is signed by the current root keys (``keys/root.pem`` and any
``--root-key``) and, when the root key itself rotates, by the new one; it is
checked as the successor of the current root before it is written
(``server/roots.py``), then the running server publishes it and agents walk to
it. Every change is audited.

Rotating the release or director key *adds* the new key and makes it the one
that signs: the old one stays trusted, since metadata it signed may still be
on its way to devices, until ``keys revoke`` removes it. Rotating the root key
replaces it: the new root is signed by both, and only the new one can sign the
next.

Order of writes, so a crash leaves something that works: the new private key
first (to ``--new-key-out``, or staged beside its file in ``keys/``), then the
new root, then the staged key moves into place. The old key is listed in the
new root, so the server may keep signing with it until the move.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server import audit
from server.db import Database
from server.keys import key_path, read_key_file
from server.paths import DataDir
from server.roots import RootStore, sign_root
from shared import PROTOCOL_VERSION
from shared.errors import AlreadyExistsError, NotFoundError, TrustError, UserInputError
from shared.files import write_private
from shared.messages import SignedEnvelope
from shared.root import ROOT_LIFETIME_S, ROOT_TYPE, RoleKeys, Root, verify_root_update
from shared.signing import KeyRole, key_id, private_key_pem, public_key_text

MIN_KEYID_PREFIX = 8
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class RootChange:
    version: int
    summary: str
    key_written: Path | None = None  # where a new private key went
    note: str = ""


def _root_signers(keys_dir: Path, root_keys: Sequence[Path]) -> list[Ed25519PrivateKey]:
    online = key_path(keys_dir, KeyRole.ROOT)
    signers = [read_key_file(online, "root key")] if online.exists() else []
    signers += [read_key_file(path, "root key") for path in root_keys]
    if not signers:
        raise UserInputError(f"the root key is not on this server ({online}): pass it with --root-key PATH")
    return signers


def _next_root(current: Root, roles: dict[KeyRole, tuple[str, ...]], added: dict[str, str]) -> Root:
    """``current`` one version on, with these key ids per role (thresholds kept, capped at the keys left),
    listing exactly the keys some role uses, valid for a year from now."""
    known = {**current.keys, **added}
    used = {kid for kids in roles.values() for kid in kids}
    return Root(
        v=PROTOCOL_VERSION, type=ROOT_TYPE, version=current.version + 1, expires=int(time.time()) + ROOT_LIFETIME_S,
        keys={kid: text for kid, text in known.items() if kid in used},
        roles={role.value: RoleKeys(roles[role], min(current.role(role).threshold, len(roles[role])))
               for role in KeyRole},
    )


def _signed(current: Root, root: Root, signers: Sequence[Ed25519PrivateKey]) -> SignedEnvelope:
    envelope = sign_root(root, signers)
    try:
        verify_root_update(current, envelope)
    except TrustError as exc:
        raise UserInputError(f"cannot sign root v{root.version}: {exc}; pass the root key(s) with --root-key PATH") \
            from exc
    return envelope


def _write_new_key(path: Path, key: Ed25519PrivateKey) -> None:
    try:
        write_private(path, private_key_pem(key), exclusive=True)
    except AlreadyExistsError:
        raise UserInputError(f"{path} already exists: a key is never overwritten; choose another --new-key-out") \
            from None


def rotate_key(data_dir: DataDir, db: Database, role: KeyRole, *, new_key_out: Path | None = None,
               root_keys: Sequence[Path] = (), actor: str = audit.SERVER) -> RootChange:
    keys_dir = data_dir.keys
    store = RootStore(keys_dir)
    current, _ = store.current()
    online = key_path(keys_dir, role)
    if role is KeyRole.DIRECTOR and new_key_out is not None:
        raise UserInputError("the director key stays on the server (it signs every directive): rotate it without "
                             "--new-key-out")
    if new_key_out is None and not online.exists():
        raise UserInputError(f"the {role.value} key is offline: say where the new one goes with --new-key-out PATH "
                             "(keep it off this server)")
    new = Ed25519PrivateKey.generate()
    new_id = key_id(new.public_key())
    roles = {r: current.role(r).keyids for r in KeyRole}
    signers = _root_signers(keys_dir, root_keys)
    if role is KeyRole.ROOT:
        roles[KeyRole.ROOT] = (new_id,)  # replaced: signed by the old and the new
        signers = [*signers, new]
    else:
        roles[role] = (*roles[role], new_id)  # added: the old one stays until revoked
    root = _next_root(current, roles, {new_id: public_key_text(new.public_key())})
    envelope = _signed(current, root, signers)
    # this rotation's own staged file: two rotations at once cannot put one's key under the other's root
    staged = online.with_name(f"{online.name}.{new_id[:16]}.next")
    if new_key_out is not None:
        _write_new_key(new_key_out, new)
    else:
        write_private(staged, private_key_pem(new), exclusive=True)
    try:
        store.save(envelope)  # refuses a version another rotation saved first
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    note = ""
    if new_key_out is None:
        os.replace(staged, online)
    elif online.exists():
        online.unlink()  # the role's key is offline from now on
        note = f"{online} removed: the {role.value} key is offline from now on"
    old = [k for k in current.role(role).keyids if k not in root.role(role).keyids]
    summary = (f"{role.value} key rotated: {new_id} signs from now on "
               + (f"(replacing {', '.join(old)})" if old else
                  "(the old one stays trusted until 'edgefleet keys revoke KEYID')"))
    with db.session() as session:
        audit.record(session, "keys.rotated", f"root of trust v{root.version}: {summary}", actor=actor,
                     data={"role": role.value, "keyid": new_id, "root_version": root.version,
                           "offline": new_key_out is not None})
    return RootChange(root.version, summary, new_key_out or online, note)


def find_keyid(root: Root, prefix: str) -> str:
    prefix = prefix.strip().lower()
    if len(prefix) < MIN_KEYID_PREFIX or not _HEX.fullmatch(prefix):
        raise UserInputError(f"a key id is {MIN_KEYID_PREFIX} to 64 hex digits, got {prefix!r}")
    matches = [kid for kid in root.keys if kid.startswith(prefix)]
    if not matches:
        raise NotFoundError(f"no key {prefix} in the root of trust v{root.version}: 'edgefleet keys show' lists them")
    if len(matches) > 1:
        raise UserInputError(f"{prefix} names {len(matches)} keys: give more of its digits")
    return matches[0]


def revoke_key(data_dir: DataDir, db: Database, keyid: str, *, root_keys: Sequence[Path] = (),
               actor: str = audit.SERVER) -> RootChange:
    keys_dir = data_dir.keys
    store = RootStore(keys_dir)
    current, _ = store.current()
    kid = find_keyid(current, keyid)
    for role in (KeyRole.DIRECTOR, KeyRole.RELEASE):
        online = key_path(keys_dir, role)
        if online.exists() and key_id(read_key_file(online, f"{role.value} key").public_key()) == kid:
            raise UserInputError(f"this server signs with {kid} ({online}): rotate the {role.value} key first "
                                 f"('edgefleet keys rotate --role {role.value}'), then revoke this one")
    roles = {r: tuple(k for k in current.role(r).keyids if k != kid) for r in KeyRole}
    for role, kids in roles.items():
        threshold = current.role(role).threshold
        if len(kids) < threshold:
            raise UserInputError(f"revoking {kid} would leave the {role.value} role {len(kids)} key(s), below its "
                                 f"threshold of {threshold}: rotate the {role.value} key first")
    root = _next_root(current, roles, {})
    envelope = _signed(current, root, _root_signers(keys_dir, root_keys))
    store.save(envelope)
    summary = f"key {kid} revoked ({', '.join(current.roles_of(kid))})"
    with db.session() as session:
        audit.record(session, "keys.revoked", f"root of trust v{root.version}: {summary}", actor=actor,
                     data={"keyid": kid, "roles": current.roles_of(kid), "root_version": root.version})
    return RootChange(root.version, summary)


def online_keys(keys_dir: Path) -> dict[str, Path]:
    """Key id -> file, for the private keys this server holds."""
    held: dict[str, Path] = {}
    for role in KeyRole:
        path = key_path(keys_dir, role)
        if path.exists():
            held[key_id(read_key_file(path, f"{role.value} key").public_key())] = path
    return held
