"""Release files for offline signing: what ``release prepare`` writes and ``release sign`` signs.

A prepared release is a ``SignedEnvelope`` of its manifest with no
signature yet; ``edgefleet release sign`` adds one with the release key, on a
machine that needs neither the server's data directory nor its database nor
TensorFlow (only this package and ``cryptography``). Signing again with
another key adds a second signature, for a release role with a threshold.
"""

from __future__ import annotations

from pathlib import Path

from shared.canonical import canonical_json, loads_strict
from shared.codec import decode, encode
from shared.errors import AlreadyExistsError, ConfigError, ProtocolError, UserInputError
from shared.files import write_private
from shared.messages import Manifest, SignedEnvelope
from shared.protocol import decode_versioned
from shared.signing import add_signatures, key_id, private_key_from_pem


def read_release_file(path: Path) -> SignedEnvelope:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return decode(SignedEnvelope, loads_strict(data))
    except (ValueError, RecursionError, ProtocolError) as exc:
        raise UserInputError(f"{path} is not a release file (a manifest with its signatures): {exc}") from exc


def release_manifest(envelope: SignedEnvelope, path: Path) -> Manifest:
    """The manifest inside, decoded as strictly as an agent will: refuse to sign anything else."""
    try:
        return decode_versioned(Manifest, envelope.signed)
    except ProtocolError as exc:
        raise UserInputError(f"{path} does not hold a release manifest: {exc}") from exc


def write_release_file(path: Path, envelope: SignedEnvelope) -> None:
    try:
        write_private(path, canonical_json(encode(envelope)), exclusive=True)
    except AlreadyExistsError:
        raise UserInputError(f"{path} already exists; choose another --out") from None


def sign_release_file(source: Path, key_file: Path, out: Path) -> tuple[Manifest, str]:
    """Sign the release in ``source`` with the private key in ``key_file`` into ``out``; returns the
    manifest and the key id that signed."""
    envelope = read_release_file(source)
    manifest = release_manifest(envelope, source)
    try:
        key = private_key_from_pem(key_file.read_bytes())
    except OSError as exc:
        raise UserInputError(f"cannot read the key {key_file}: {exc.strerror or exc}") from exc
    except ConfigError as exc:
        raise UserInputError(f"{key_file}: {exc}") from exc
    signed = add_signatures(envelope, [key])
    write_release_file(out, signed)
    return manifest, key_id(key.public_key())
