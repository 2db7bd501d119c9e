"""Signed releases: the manifest agents verify for one artifact.

Files with size, sha256 and per-chunk sha256, reference metrics, the target
profile's RAM limit (the agent's trial stays under it) and thread count, and a fresh monotonic
release counter (the release's id), signed with the release key.

With the release key online, ``sign_release`` does it all. With it offline
(the default), a release goes through three steps, two of them here:
``prepare_release`` builds exactly the manifest ``sign_release`` would and
reserves its counter (a release row holding the unsigned manifest under
``PREPARED``); ``edgefleet release sign`` signs it on the machine that holds
the key (``shared/release_files.py``); ``import_release`` checks the
signature against the current root of trust and that the signed manifest is
the prepared one, and stores it. ``rollout start`` then ships the newest
imported release of the variant (``signed_release_for``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from server import audit
from server.blobs import BlobStore
from server.catalog import resolve_version
from server.db import Database, Session, queries
from server.db.models import Artifact, Profile, Release
from server.keys import SigningKeys
from shared import PROTOCOL_VERSION
from shared.codec import decode, encode
from shared.errors import ConfigError, NotFoundError, TrustError, UserInputError
from shared.messages import Manifest, ReferenceMetrics, SignedEnvelope, describe_file
from shared.protocol import decode_versioned, encode_versioned
from shared.root import Root
from shared.signing import envelope_digest, sign_envelope, verify_manifest

logger = logging.getLogger(__name__)

MANIFEST_LIFETIME_S = 365 * 24 * 3600
PREPARED = "prepared"  # Release.manifest of a release prepared for offline signing: {"prepared": <manifest>}


def offline_steps(ref: str, profile: str) -> str:
    """The commands that make a release while the release key is offline."""
    return (f"'edgefleet release prepare {ref} --profile {profile} --out unsigned.json', sign it where the release "
            "key is with 'edgefleet release sign unsigned.json --key release.pem --out release.json', then "
            "'edgefleet release import release.json'")


def _manifest(session: Session, blobs: BlobStore, artifact: Artifact, counter: int) -> Manifest:
    version = artifact.model_version
    now = int(time.time())
    profile = session.get(Profile, artifact.profile_name)
    return Manifest(
        v=PROTOCOL_VERSION,
        model=version.model.name,
        version=version.version,
        release_counter=counter,
        profile=artifact.profile_name,
        quantization=artifact.quantization,
        files=(
            describe_file("model.tflite", "model", blobs.read(artifact.sha256)),
            describe_file("eval.npz", "eval", blobs.read(version.eval_sha256)),
        ),
        reference=ReferenceMetrics(
            accuracy=version.reference_accuracy, host_accuracy=artifact.host_accuracy, host_p50_ms=artifact.host_p50_ms
        ),
        created=now,
        expires=now + MANIFEST_LIFETIME_S,
        max_ram_bytes=profile.max_ram_bytes if profile is not None else None,
        threads=profile.threads if profile is not None else None,
    )


def _reserve(session: Session, artifact: Artifact) -> Release:
    release = Release(artifact_id=artifact.id, manifest={}, manifest_sha256="")
    session.add(release)
    session.flush()  # assigns the id, which is the release counter
    return release


def sign_release(session: Session, blobs: BlobStore, keys: SigningKeys, artifact: Artifact) -> Release:
    """A new release of ``artifact``: its counter is higher than every earlier one."""
    if keys.release is None:
        version = artifact.model_version
        raise ConfigError(f"this server holds no release key (it is offline): make the release with "
                          f"{offline_steps(f'{version.model.name}:{version.version}', artifact.profile_name)}")
    release = _reserve(session, artifact)
    manifest = _manifest(session, blobs, artifact, release.id)
    release.model_sha256, release.eval_sha256 = artifact.sha256, artifact.model_version.eval_sha256
    return _signed(session, release, manifest, keys)


def resign_release(session: Session, keys: SigningKeys, previous: Release) -> Release:
    """A new release of exactly the files ``previous`` named, with a higher counter and fresh dates.

    A fleet rollback ships a device's previous release again: the agent refuses a release counter
    lower than one it trusts, so the old manifest itself would be refused. Same files, same digests:
    an agent that still holds them in its other slot copies them instead of downloading.
    Only with the release key online: an offline key cannot sign on the server's schedule.
    """
    if keys.release is None:
        raise ConfigError("re-signing a release needs the release key, and this server holds none (it is offline): "
                          "prepare, sign and import a release of the version to go back to, then roll it out")
    old = decode_versioned(Manifest, previous.manifest["signed"])
    release = Release(artifact_id=previous.artifact_id, manifest={}, manifest_sha256="",
                      model_sha256=previous.model_sha256, eval_sha256=previous.eval_sha256)
    session.add(release)
    session.flush()  # the id is the release counter
    now = int(time.time())
    manifest = Manifest(
        v=PROTOCOL_VERSION, model=old.model, version=old.version, release_counter=release.id, profile=old.profile,
        quantization=old.quantization, files=old.files, reference=old.reference, created=now,
        expires=now + MANIFEST_LIFETIME_S, max_ram_bytes=old.max_ram_bytes, threads=old.threads,
    )
    return _signed(session, release, manifest, keys)


def _signed(session: Session, release: Release, manifest: Manifest, keys: SigningKeys) -> Release:
    assert keys.release is not None
    return _store(session, release, sign_envelope(manifest, keys.release))


def _store(session: Session, release: Release, envelope: SignedEnvelope) -> Release:
    release.manifest = encode(envelope)
    release.manifest_sha256 = envelope_digest(envelope)
    session.flush()
    return release


# -- offline signing ------------------------------------------------------------------------------


def _artifact(session: Session, ref: str, profile: str) -> tuple[str, Artifact]:
    version = resolve_version(session, ref)
    ref = f"{version.model.name}:{version.version}"
    artifact = queries.artifact_for_ids(session, version.id, profile)
    if artifact is None:
        raise NotFoundError(f"no variant of {ref} is built for profile {profile}: "
                            f"run 'edgefleet model build {ref} --profile {profile}'")
    return ref, artifact


def prepare_release(db: Database, blobs: BlobStore, model_ref: str, profile: str, *,
                    actor: str = audit.SERVER) -> SignedEnvelope:
    """The unsigned manifest of a new release of the variant ``profile`` ships (an envelope with no
    signature), its counter reserved: exactly what ``sign_release`` would sign."""
    with db.session() as session:
        ref, artifact = _artifact(session, model_ref, profile)
        release = _reserve(session, artifact)
        manifest = encode_versioned(_manifest(session, blobs, artifact, release.id))
        release.manifest = {PREPARED: manifest}
        audit.record(session, "release.prepared", f"release {release.id} of {ref} for {profile} prepared for "
                     "offline signing", actor=actor, data={"release": release.id})
    return SignedEnvelope(signed=manifest, signatures=())


def import_release(db: Database, root: Root, envelope: SignedEnvelope, *, now: float | None = None,
                   actor: str = audit.SERVER) -> Manifest:
    """Store a release signed offline: its signatures must satisfy the current root's release role, and it
    must be exactly the manifest prepared under its counter (files, digests, counter, dates)."""
    try:
        manifest = verify_manifest(envelope, root.trusted_keys(), now=time.time() if now is None else now)
    except TrustError as exc:
        raise UserInputError(f"refusing this release: {exc} (root of trust v{root.version})") from exc
    with db.session() as session:
        release = queries.release(session, manifest.release_counter)
        if release is None or (PREPARED not in release.manifest and not release.manifest_sha256):
            raise NotFoundError(f"release {manifest.release_counter} was never prepared here: run 'edgefleet "
                                f"release prepare {manifest.model}:{manifest.version} --profile {manifest.profile}'")
        if PREPARED not in release.manifest:
            if release.manifest.get("signed") == envelope.signed:
                return manifest  # imported before: nothing to do
            raise UserInputError(f"release {release.id} is already signed and stored; prepare a new one")
        prepared = release.manifest[PREPARED]
        if envelope.signed != prepared:
            old = decode_versioned(Manifest, prepared)
            differ = [f.name for f in dataclasses.fields(Manifest) if getattr(old, f.name) != getattr(manifest, f.name)]
            raise UserInputError(f"the signed manifest differs from the one prepared as release {release.id} in: "
                                 f"{', '.join(differ) or 'its encoding'}")
        artifact = release.artifact
        release.model_sha256, release.eval_sha256 = artifact.sha256, artifact.model_version.eval_sha256
        _store(session, release, envelope)
        audit.record(session, "release.imported",
                     f"release {release.id} of {manifest.model}:{manifest.version} for {manifest.profile}, signed "
                     f"offline by {', '.join(s.keyid[:16] for s in envelope.signatures)}", actor=actor,
                     data={"release": release.id, "keyids": [s.keyid for s in envelope.signatures]})
    return manifest


def signed_release_for(session: Session, artifact: Artifact, root: Root | None, ref: str, *,
                       now: float | None = None) -> Release:
    """With the release key offline: the newest signed release of ``artifact`` that the current root still
    trusts and that has not expired. Raises UserInputError naming the commands that make one."""
    now = time.time() if now is None else now
    release = queries.newest_signed_release(session, artifact.id)
    if release is None:
        raise UserInputError(f"no signed release of {ref} for profile {artifact.profile_name}, and this server holds "
                             f"no release key (it is offline): run {offline_steps(ref, artifact.profile_name)}")
    if root is not None:
        try:
            verify_manifest(decode(SignedEnvelope, release.manifest), root.trusted_keys(), now=now)
        except TrustError as exc:
            raise UserInputError(f"release {release.id} of {ref} for {artifact.profile_name} cannot ship: {exc}; "
                                 f"make a new one: {offline_steps(ref, artifact.profile_name)}") from exc
    return release

