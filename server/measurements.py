"""Candidates measured on the target: ``model build --measure-on DEVICE``.

The host times every candidate with one profile thread count on an x86 core; the fleet runs Cortex-A72s
with four, where float16, dynamic range and int8 rank differently. So a build may send each candidate
that built to reference devices of the profile for a benchmark-only trial (``agent/measure.py``):

1. ``request`` signs each candidate's manifest with the release key (files, the profile's threads and
   RAM limit, a counter no agent has outgrown) and, per device, a ``MeasureOrder`` with the director
   key, and stores both as a pending ``Measurement`` row. Nothing is released or shipped.
2. The server's loop (``send_due``) publishes each device's oldest pending command on its ``cmd``
   topic, again every ``RESEND_S`` and whenever the device says hello, until it reports; the chunk
   server serves the candidates' files while their measurements are open.
3. The device's ``measurement`` telemetry lands in the row (``record``), idempotently.
4. ``wait`` polls the rows; ``with_device_numbers`` puts the devices' p50/p95, peak RSS and accuracy (on
   the eval slice that travelled, so judged against the float model on that slice) into the variants,
   keeps the host's under ``details["host"]``, and marks a candidate a device could not run as failed.
   The profile's ``auto`` then chooses by those numbers.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from server.blobs import BlobStore
from server.compress.progress import BuildEvent, ProgressCallback, Step
from server.db import Database, Session
from server.db.models import Device, Measurement, ModelVersion, Profile, Release
from server.keys import SigningKeys
from shared import PROTOCOL_VERSION
from shared.canonical import canonical_json
from shared.errors import NotFoundError, UserInputError
from shared.messages import Command, Manifest, MeasureOrder, ReferenceMetrics, Telemetry, describe_file
from shared.protocol import encode_versioned
from shared.signing import envelope_digest, sign_envelope
from shared.topics import TopicKind, device_topic

if TYPE_CHECKING:  # the server's loop imports this module (ingest): no compression pipeline in it
    from server.compress.pipeline import ProfileGoal, VariantReport

logger = logging.getLogger(__name__)

RESEND_S = 20.0  # a device that has not reported gets its command again (it ignores a repeat it is running)
DEFAULT_TIMEOUT_S = 900.0
OPEN, DONE, FAILED, EXPIRED = "pending", "done", "failed", "expired"


@dataclass(frozen=True)
class DeviceResult:
    device: str  # its name
    recipe: str
    state: str
    p50_ms: float | None
    p95_ms: float | None
    peak_rss_bytes: int | None
    accuracy: float | None
    runtime: str
    threads: int | None
    reason: str


def _now() -> datetime:
    return datetime.now(timezone.utc)


def reference_devices(session: Session, names: Sequence[str], profiles: Sequence[str]) -> dict[str, list[Device]]:
    """The devices named by ``--measure-on``, by the profile they belong to; each must be online and of a
    profile this build builds (a manifest is signed for one profile, and an agent refuses any other)."""
    by_profile: dict[str, list[Device]] = {}
    for name in dict.fromkeys(names):
        device = session.scalar(select(Device).where(Device.name == name, Device.removed_at.is_(None)))
        if device is None:
            raise NotFoundError(f"--measure-on {name}: no such device (see 'edgefleet device list')")
        if device.profile_name not in profiles:
            raise UserInputError(f"--measure-on {name}: the device is a {device.profile_name}, and this build is for "
                                 f"{', '.join(profiles)}; measure a profile's candidates on a device of that profile")
        if not device.online:
            raise UserInputError(f"--measure-on {name}: the device is offline; it must be online to run the "
                                 "candidates")
        by_profile.setdefault(device.profile_name, []).append(device)
    return by_profile


def request(
    db: Database, blobs: BlobStore, keys: SigningKeys, version_id: int, profile_name: str,
    variants: Sequence[VariantReport], device_ids: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[str]:
    """Sign and store one pending measurement per (candidate that built, device); their ids."""
    assert keys.release is not None, "the caller checks that the release key is online"
    now = int(time.time())
    created = datetime.fromtimestamp(now, timezone.utc)
    expires = now + int(timeout_s) + 60
    ids = []
    with db.session() as session:
        version = session.get(ModelVersion, version_id)
        profile = session.get(Profile, profile_name)
        assert version is not None and profile is not None
        counter = session.scalar(select(func.max(Release.id))) or 0  # refused by no agent, moved by none
        eval_bytes = blobs.read(version.eval_sha256)
        for variant in variants:
            if variant.tflite is None or variant.verdict == "failed":
                continue
            sha256 = blobs.put(variant.tflite)
            manifest = sign_envelope(Manifest(
                v=PROTOCOL_VERSION, model=version.model.name, version=version.version, release_counter=counter,
                profile=profile.name, quantization=variant.quantization,
                files=(describe_file("model.tflite", "model", variant.tflite),
                       describe_file("eval.npz", "eval", eval_bytes)),
                reference=ReferenceMetrics(accuracy=version.reference_accuracy,
                                           host_accuracy=variant.accuracy or 0.0, host_p50_ms=variant.p50_ms),
                created=now, expires=expires, max_ram_bytes=profile.max_ram_bytes, threads=profile.threads,
            ), keys.release)
            for device_id in device_ids:
                measurement_id = f"m-{uuid.uuid4().hex[:16]}"
                order = sign_envelope(MeasureOrder(
                    v=PROTOCOL_VERSION, device_id=device_id, measurement_id=measurement_id,
                    manifest_sha256=envelope_digest(manifest), issued=now, expires=expires,
                ), keys.director)
                command = Command(v=PROTOCOL_VERSION, name="measure", order=order, manifest=manifest)
                session.add(Measurement(
                    id=measurement_id, device_id=device_id, model_version_id=version.id, profile_name=profile.name,
                    recipe=variant.recipe, model_sha256=sha256, eval_sha256=version.eval_sha256,
                    command=encode_versioned(command), state=OPEN,
                    expires_at=datetime.fromtimestamp(expires, timezone.utc), created_at=created,
                    position=len(ids),
                ))
                ids.append(measurement_id)
    return ids


# -- the server's side ----------------------------------------------------------------------------


def send_due(session: Session, publish: Callable[[str, bytes], None], now: datetime | None = None) -> int:
    """Publish each online device's oldest open measurement if it was never sent, or not for ``RESEND_S``;
    expire the ones whose order expired. Returns how many were sent."""
    now = now or _now()
    sent = 0
    seen: set[str] = set()
    rows = session.scalars(select(Measurement).where(Measurement.state == OPEN)
                           .order_by(Measurement.created_at, Measurement.position)).all()
    for row in rows:
        if _aware(row.expires_at) <= now:
            row.state, row.reason, row.updated_at = EXPIRED, "the device did not report before the order expired", now
            continue
        if row.device_id in seen:
            continue  # one at a time per device: the next once this one reported
        seen.add(row.device_id)
        if not row.device.online:
            continue
        if row.published_at is not None and now - _aware(row.published_at) < timedelta(seconds=RESEND_S):
            continue
        publish(device_topic(TopicKind.CMD, row.device_id), canonical_json(row.command))
        row.published_at = now
        sent += 1
    return sent


def on_hello(session: Session, device_id: str) -> None:
    """A device (re)connected: its open measurement goes out at the next send, whatever it ran before."""
    for row in session.scalars(select(Measurement).where(Measurement.device_id == device_id,
                                                          Measurement.state == OPEN)):
        row.published_at = None


def record(session: Session, device: Device, message: Telemetry) -> None:
    """A device's ``measurement`` telemetry: the first result for an open measurement of its own counts."""
    row = session.get(Measurement, message.deployment_id or "")
    if row is None or row.device_id != device.id or row.state != OPEN:
        logger.info("measurement %s of %s: no open measurement of that device by that id", message.deployment_id,
                    device.name)
        return
    bench = message.benchmark
    if bench is None:
        row.state, row.reason = FAILED, message.reason or "the device gave no reason"
    else:
        row.state = DONE
        row.p50_ms, row.p95_ms, row.peak_rss_bytes = bench.p50_ms, bench.p95_ms, bench.peak_rss_bytes
        row.accuracy, row.runtime, row.threads = message.accuracy, bench.runtime, bench.threads
    row.updated_at = _now()


# -- the build's side ------------------------------------------------------------------------------


def wait(db: Database, ids: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 0.5,
         on_result: Callable[[DeviceResult], object] = lambda result: None) -> list[DeviceResult]:
    """Every measurement's result once none is open (or the timeout passed: those still open expire)."""
    deadline = time.monotonic() + timeout_s
    told: set[str] = set()
    while True:
        with db.session() as session:
            rows = session.scalars(select(Measurement).where(Measurement.id.in_(ids))).all()
            if time.monotonic() >= deadline:
                for row in rows:
                    if row.state == OPEN:
                        row.state, row.reason = EXPIRED, f"no result within {timeout_s:g} s"
            results = {row.id: _result(row) for row in rows}
        for measurement_id, result in results.items():
            if result.state != OPEN and measurement_id not in told:
                told.add(measurement_id)
                on_result(result)
        if all(result.state != OPEN for result in results.values()):
            return [results[i] for i in ids if i in results]
        time.sleep(poll_s)


def _result(row: Measurement) -> DeviceResult:
    return DeviceResult(row.device.name, row.recipe, row.state, row.p50_ms, row.p95_ms, row.peak_rss_bytes,
                        row.accuracy, row.runtime, row.threads, row.reason)


def with_device_numbers(
    variants: Sequence[VariantReport], results: Sequence[DeviceResult],
) -> tuple[list[VariantReport], bool]:
    """The variants with the devices' numbers (the median over devices) in place of the host's, and whether
    they are the devices' numbers.

    A candidate that a device could not run fails, with the device's reason. If any other candidate sent
    has no result (its order expired), device and host numbers cannot be compared: every variant keeps the
    host's, and ``details["measured_on"]`` says which devices did not answer."""
    by_recipe: dict[str, list[DeviceResult]] = {}
    for result in results:
        by_recipe.setdefault(result.recipe, []).append(result)
    unanswered = sorted({r.device for r in results if r.state not in (DONE, FAILED)})
    measured = []
    for variant in variants:
        mine = by_recipe.get(variant.recipe, [])
        failed = [r for r in mine if r.state == FAILED]
        done = [r for r in mine if r.state == DONE]
        details = dict(variant.details)
        if failed:
            reason = "; ".join(f"on {r.device}: {r.reason}" for r in failed)
            details["measured_on"] = {"devices": [r.device for r in failed], "failed": reason}
            measured.append(replace(variant, verdict="failed", reason=reason, details=details))
        elif unanswered or not done:
            if mine:
                details["measured_on"] = {"devices": [], "unanswered": unanswered}
            measured.append(replace(variant, details=details))
        else:
            details["host"] = {"p50_ms": variant.p50_ms, "p95_ms": variant.p95_ms,
                               "peak_rss_bytes": variant.peak_rss_bytes, "accuracy": variant.accuracy}
            details["measured_on"] = {"devices": [r.device for r in done], "runtime": done[0].runtime,
                                      "threads": done[0].threads}
            measured.append(replace(
                variant, p50_ms=_median([r.p50_ms for r in done]), p95_ms=_median([r.p95_ms for r in done]),
                peak_rss_bytes=int(_median([r.peak_rss_bytes for r in done])),
                accuracy=_median([r.accuracy for r in done]), details=details,
            ))
    return measured, bool(results) and not unanswered


def measure_candidates(
    db: Database, blobs: BlobStore, keys: SigningKeys, version_id: int, goal: ProfileGoal,
    variants: list[VariantReport], device_ids: list[str], references: tuple[float, float], timeout_s: float,
    progress: ProgressCallback,
) -> tuple[float, list[VariantReport]]:
    """The profile's candidates timed on its reference devices and judged again by their numbers: accuracy
    on the eval slice that travelled, against the float model's on that slice (``references``: the host's
    full-eval reference, then the slice's). If a device did not answer, the host's numbers stand."""
    from server.compress.pipeline import choose

    ids = request(db, blobs, keys, version_id, goal.name, variants, device_ids, timeout_s=timeout_s)
    total = len(ids)
    progress(BuildEvent(Step.DEVICE, goal.name, index=0, total=total,
                        detail=f"{total} benchmark-only trials sent to the profile's reference devices"))

    def heard(result: DeviceResult) -> None:
        how = (f"p50 {result.p50_ms:.4f} ms, p95 {result.p95_ms:.4f} ms, accuracy {result.accuracy:.4f} "
               f"({result.runtime}, {result.threads} threads)" if result.state == DONE
               else f"{result.state}: {result.reason}")
        progress(BuildEvent(Step.DEVICE, goal.name, result.recipe, total=total,
                            detail=f"on {result.device}: {how}", failed=result.state != DONE))

    results = wait(db, ids, timeout_s=timeout_s, on_result=heard)
    measured, on_device = with_device_numbers(variants, results)
    reference = references[1] if on_device else references[0]
    return reference, choose(measured, goal, reference)


def _median(values: Sequence[float | int | None]) -> float:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else 0.0


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
