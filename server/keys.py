"""The server's private keys in ``DATA_DIR/keys`` (0700, every file 0600), and the ones it signs with.

- ``director.pem``: the online director key; the running server signs every directive with it.
- ``release.pem``: the release key, *only* when it is online (``edgefleet init --release-key online``,
  the single-box convenience). By default it lives offline: ``init`` writes it elsewhere, releases are
  signed with ``edgefleet release sign`` on the machine that holds it and brought in with
  ``edgefleet release import`` (``server/releases.py``). Uptane's split: a compromised server then holds
  the director key alone, which cannot make an agent install a release of its choosing.
- ``root.pem``: the root key, which signs new versions of the root of trust (``server/roots.py``). It can
  be moved off the server too; the ``keys`` commands then take ``--root-key PATH``.
- ``root/N.json``: every version of the signed root of trust.

A key the server signs with must be listed in its role in the current root: the server refuses to
start (and ``rollout start`` refuses to sign) otherwise.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.roots import RootStore, make_root, sign_root
from shared.errors import AlreadyExistsError, ConfigError, UserInputError
from shared.files import private_dir, write_private
from shared.root import Root
from shared.signing import KeyRole, key_id, private_key_from_pem, private_key_pem, public_key_text


class ReleaseKeyMode(enum.Enum):
    ONLINE = "online"  # keys/release.pem: this server signs releases itself
    OFFLINE = "offline"  # no release private key here: releases are signed elsewhere and imported


def key_path(directory: Path, role: KeyRole) -> Path:
    return directory / f"{role.value}.pem"


def new_key_file(path: Path, *, exclusive: bool = True) -> Ed25519PrivateKey:
    """Generate a key and write it to ``path`` (0600, atomically; ``exclusive``: never over a file)."""
    key = Ed25519PrivateKey.generate()
    write_private(path, private_key_pem(key), exclusive=exclusive)
    return key


def read_key_file(path: Path, what: str) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"no {what} at {path}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    try:
        return private_key_from_pem(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def keys_stamp(directory: Path) -> tuple[int, int]:
    """Changes when a key file is replaced or a root version added (a running server's cheap check)."""
    return os.stat(directory).st_mtime_ns, RootStore(directory).stamp()


def release_key_mode(directory: Path) -> ReleaseKeyMode:
    return ReleaseKeyMode.ONLINE if key_path(directory, KeyRole.RELEASE).exists() else ReleaseKeyMode.OFFLINE


@dataclass(frozen=True)
class SigningKeys:
    """What this server signs with. ``release`` is None when the release key is offline; ``root`` is the
    current root of trust when loaded from a data directory (releases are checked against it)."""

    release: Ed25519PrivateKey | None
    director: Ed25519PrivateKey
    root: Root | None = None

    def public_texts(self) -> dict[KeyRole, str]:
        """The public keys this server holds (no release key when it is offline)."""
        held = {KeyRole.RELEASE: self.release, KeyRole.DIRECTOR: self.director}
        return {role: public_key_text(key.public_key()) for role, key in held.items() if key is not None}


def _listed(root: Root, role: KeyRole, key: Ed25519PrivateKey, path: Path) -> Ed25519PrivateKey:
    kid = key_id(key.public_key())
    if kid not in root.role(role).keyids:
        raise ConfigError(
            f"the online {role.value} key {kid} ({path}) is not in the {role.value} role of the root of trust "
            f"v{root.version}: refusing to sign with it ('edgefleet keys show' lists the trusted keys; "
            f"'edgefleet keys rotate --role {role.value}' makes a listed one)"
        )
    return key


def load_keys(directory: Path) -> SigningKeys:
    root, _ = RootStore(directory).current()
    director_path = key_path(directory, KeyRole.DIRECTOR)
    try:
        director = read_key_file(director_path, "director key")
    except ConfigError as exc:
        raise ConfigError(f"{exc}: run 'edgefleet init' first") from exc
    director = _listed(root, KeyRole.DIRECTOR, director, director_path)
    release_path = key_path(directory, KeyRole.RELEASE)
    release = None
    if release_path.exists():
        release = _listed(root, KeyRole.RELEASE, read_key_file(release_path, "release key"), release_path)
    return SigningKeys(release=release, director=director, root=root)


# -- edgefleet init ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySetup:
    """What ``init`` found or made: the release key's mode, where it wrote an offline one, the root."""

    mode: ReleaseKeyMode
    root_version: int
    release_key_written: Path | None = None  # this run wrote the offline release key here
    created_root: bool = False
    note: str = ""


def setup_keys(
    directory: Path, requested: ReleaseKeyMode | None, release_key_out: Path | None, *,
    default: ReleaseKeyMode = ReleaseKeyMode.ONLINE,
) -> KeySetup:
    """Create what is missing; an existing data directory keeps its mode (asking for the other is an error).

    ``requested`` None: the existing mode, or ``default`` for a new directory. A directory from before the
    root of trust (release.pem and director.pem, no root) is online: its keys go into a new root v1 as
    they are, so agents that pin them keep working.
    """
    store = RootStore(directory)
    has_root = store.exists()
    release_online = key_path(directory, KeyRole.RELEASE).exists()
    existing = ReleaseKeyMode.ONLINE if release_online else (ReleaseKeyMode.OFFLINE if has_root else None)
    if existing is not None and requested is not None and requested is not existing:
        how = ("to take it offline, rotate it: 'edgefleet keys rotate --role release --new-key-out PATH'"
               if existing is ReleaseKeyMode.ONLINE else "an offline release key is never brought onto the server")
        raise UserInputError(f"{directory.parent} already has an {existing.value} release key, and init does not "
                             f"switch modes; {how}")
    mode = existing or requested or default
    if not has_root and mode is ReleaseKeyMode.OFFLINE and release_key_out is None:
        raise UserInputError(
            "an offline release key (the default) needs --release-key-out PATH: where to write its private "
            "key, to keep off this server; or --release-key online for a single-box install"
        )
    private_dir(directory)
    director_path = key_path(directory, KeyRole.DIRECTOR)
    if not director_path.exists():
        new_key_file(director_path)
    if has_root:
        root, _ = store.current()
        note = ""
        if release_key_out is not None:
            note = f"--release-key-out unused: {directory.parent} already has its keys and root of trust"
        return KeySetup(mode, root.version, note=note)
    root_path = key_path(directory, KeyRole.ROOT)
    root_key = read_key_file(root_path, "root key") if root_path.exists() else new_key_file(root_path)
    written = None
    if mode is ReleaseKeyMode.ONLINE:
        release_path = key_path(directory, KeyRole.RELEASE)
        release = read_key_file(release_path, "release key") if release_online else new_key_file(release_path)
    else:
        assert release_key_out is not None
        try:
            release = new_key_file(release_key_out)
        except AlreadyExistsError:
            raise UserInputError(f"{release_key_out} already exists: init never overwrites a key; choose another "
                                 "--release-key-out") from None
        written = release_key_out
    director = read_key_file(director_path, "director key")
    root = make_root(1, {KeyRole.ROOT: [root_key.public_key()], KeyRole.RELEASE: [release.public_key()],
                         KeyRole.DIRECTOR: [director.public_key()]})
    store.save(sign_root(root, [root_key]))
    return KeySetup(mode, 1, release_key_written=written, created_root=True)
