"""Per-profile artifacts and the signed releases that ship them.

``build_artifact`` converts a model version with its profile's quantization,
evaluates the variant on the host (accuracy on the travelling eval set,
benchmark_model-style latency) and keeps the .tflite in the blob store.
``sign_release`` writes the manifest agents verify: files with size, sha256
and per-chunk sha256, reference metrics, a fresh monotonic release counter.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from server.blobs import BlobStore
from server.compress import convert
from server.compress.evalset import load_eval_file
from server.compress.host_eval import evaluate_variant
from server.compress.quantization import Quantization
from server.db import Session, queries
from server.db.models import Artifact, ModelVersion, Profile, Release
from server.keys import SigningKeys
from server.native_output import native_stderr_to_log
from shared import PROTOCOL_VERSION
from shared.codec import encode
from shared.messages import Manifest, ReferenceMetrics, describe_file
from shared.signing import envelope_digest, sign_envelope

logger = logging.getLogger(__name__)

MANIFEST_LIFETIME_S = 365 * 24 * 3600


@dataclass(frozen=True)
class ArtifactInfo:
    profile: str
    quantization: str
    size_bytes: int
    host_accuracy: float
    host_p50_ms: float | None


def build_artifact(session: Session, blobs: BlobStore, version: ModelVersion, profile: Profile) -> Artifact:
    """The variant of ``version`` for ``profile``; built once, then reused."""
    existing = queries.artifact_for(session, version, profile.name)
    if existing is not None:
        return existing
    quantization = Quantization.parse(profile.quantization)
    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        work = Path(tmp)
        source = work / version.source_name
        source.write_bytes(blobs.read(version.source_sha256))
        eval_path = work / "eval.npz"
        eval_path.write_bytes(blobs.read(version.eval_sha256))
        evalset = load_eval_file(eval_path)
        logger.info("building %s for %s (%s)", version.model.name, profile.name, quantization.value)
        with native_stderr_to_log(f"converting {version.model.name} to {quantization.value}"):
            flatbuffer = convert.convert(convert.load_keras_model(source), quantization, evalset.x)
            tflite = work / "model.tflite"
            tflite.write_bytes(flatbuffer)
            host = evaluate_variant(tflite, evalset, threads=1)
    artifact = Artifact(
        model_version_id=version.id,
        profile_name=profile.name,
        quantization=quantization.value,
        sha256=blobs.put(flatbuffer),
        size_bytes=len(flatbuffer),
        host_accuracy=host.accuracy,
        host_p50_ms=host.p50_ms,
        host_p95_ms=host.p95_ms,
    )
    session.add(artifact)
    session.flush()
    return artifact


def sign_release(session: Session, blobs: BlobStore, keys: SigningKeys, artifact: Artifact) -> Release:
    """A new release of ``artifact``: its counter is higher than every earlier one."""
    version = artifact.model_version
    release = Release(artifact_id=artifact.id, manifest={}, manifest_sha256="")
    session.add(release)
    session.flush()  # assigns the id, which is the release counter
    now = int(time.time())
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
    )
    envelope = sign_envelope(manifest, keys.release)
    release.manifest = encode(envelope)
    release.manifest_sha256 = envelope_digest(envelope)
    session.flush()
    return release
