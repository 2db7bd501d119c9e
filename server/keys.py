"""The server's signing keys: created by ``edgefleet init``, loaded per command.

The release key signs manifests (used when a rollout is prepared); the
director key signs per-device directives (used by the running server).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.errors import ConfigError
from shared.signing import KeyRole, private_key_from_pem, private_key_pem, public_key_text


@dataclass(frozen=True)
class SigningKeys:
    release: Ed25519PrivateKey
    director: Ed25519PrivateKey

    def public_texts(self) -> dict[KeyRole, str]:
        return {
            KeyRole.RELEASE: public_key_text(self.release.public_key()),
            KeyRole.DIRECTOR: public_key_text(self.director.public_key()),
        }


def _key_path(directory: Path, role: KeyRole) -> Path:
    return directory / f"{role.value}.pem"


def create_keys(directory: Path) -> SigningKeys:
    """Create any missing key; existing keys are kept (init is idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for role in KeyRole:
        path = _key_path(directory, role)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(private_key_pem(Ed25519PrivateKey.generate()))
    return load_keys(directory)


def load_keys(directory: Path) -> SigningKeys:
    keys = {}
    for role in KeyRole:
        path = _key_path(directory, role)
        try:
            keys[role] = private_key_from_pem(path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(f"no {role.value} key at {path}: run 'edgefleet init' first") from exc
    return SigningKeys(release=keys[KeyRole.RELEASE], director=keys[KeyRole.DIRECTOR])
