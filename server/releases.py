"""Signed releases: the manifest agents verify for one artifact.

Files with size, sha256 and per-chunk sha256, reference metrics, the target
profile's RAM limit (the agent's trial stays under it), and a fresh monotonic
release counter (the release's id), signed with the release key.
"""

from __future__ import annotations

import logging
import time

from server.blobs import BlobStore
from server.db import Session
from server.db.models import Artifact, Profile, Release
from server.keys import SigningKeys
from shared import PROTOCOL_VERSION
from shared.codec import decode, encode
from shared.messages import Manifest, ReferenceMetrics, describe_file
from shared.signing import envelope_digest, sign_envelope

logger = logging.getLogger(__name__)

MANIFEST_LIFETIME_S = 365 * 24 * 3600


def sign_release(session: Session, blobs: BlobStore, keys: SigningKeys, artifact: Artifact) -> Release:
    """A new release of ``artifact``: its counter is higher than every earlier one."""
    version = artifact.model_version
    release = Release(artifact_id=artifact.id, manifest={}, manifest_sha256="")
    session.add(release)
    session.flush()  # assigns the id, which is the release counter
    now = int(time.time())
    profile = session.get(Profile, artifact.profile_name)
    manifest = Manifest(
        v=PROTOCOL_VERSION,
        model=version.model.name,
        version=version.version,
        release_counter=release.id,
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
    )
    release.model_sha256, release.eval_sha256 = artifact.sha256, version.eval_sha256
    return _signed(session, release, manifest, keys)


def resign_release(session: Session, keys: SigningKeys, previous: Release) -> Release:
    """A new release of exactly the files ``previous`` named, with a higher counter and fresh dates.

    A fleet rollback ships a device's previous release again: the agent refuses a release counter
    lower than one it trusts, so the old manifest itself would be refused. Same files, same digests:
    an agent that still holds them in its other slot copies them instead of downloading.
    """
    old = decode(Manifest, previous.manifest["signed"])
    release = Release(artifact_id=previous.artifact_id, manifest={}, manifest_sha256="",
                      model_sha256=previous.model_sha256, eval_sha256=previous.eval_sha256)
    session.add(release)
    session.flush()  # the id is the release counter
    now = int(time.time())
    manifest = Manifest(
        v=PROTOCOL_VERSION, model=old.model, version=old.version, release_counter=release.id, profile=old.profile,
        quantization=old.quantization, files=old.files, reference=old.reference, created=now,
        expires=now + MANIFEST_LIFETIME_S, max_ram_bytes=old.max_ram_bytes,
    )
    return _signed(session, release, manifest, keys)


def _signed(session: Session, release: Release, manifest: Manifest, keys: SigningKeys) -> Release:
    envelope = sign_envelope(manifest, keys.release)
    release.manifest = encode(envelope)
    release.manifest_sha256 = envelope_digest(envelope)
    session.flush()
    return release
