"""Serving telemetry for the latency tests: a report built from the very samples that went into it."""

from __future__ import annotations

from collections.abc import Sequence

from server.db import Database
from server.ingest import apply_telemetry
from shared import PROTOCOL_VERSION
from shared.histogram import LatencyHistogram
from shared.messages import ServingReport, SystemStats, Telemetry

BOOT = "boot-1"


def histogram(samples_ms: Sequence[float]) -> LatencyHistogram:
    result = LatencyHistogram()
    for ms in samples_ms:
        result.record(ms)
    return result


def serving(device_id: str, seq: int, samples_ms: Sequence[float], *, end: float, interval_s: float = 10.0,
            boot: str = BOOT, model: str = "digits", version: int = 1, source: str = "traffic", errors: int = 0,
            deployment_id: str | None = None) -> Telemetry:
    invoke = histogram(samples_ms)
    e2e = histogram([ms + 0.2 for ms in samples_ms])
    report = ServingReport(
        model=model, version=version, sha256="ab" * 32, quantization="int8", runtime="litert 1.0.1", threads=1,
        source=source, start=end - interval_s, end=end, calls=len(samples_ms) + errors, errors=errors,
        samples=len(samples_ms), invoke=invoke.to_wire(), e2e=e2e.to_wire(), p50_ms=invoke.percentile(50),
        p90_ms=invoke.percentile(90), p99_ms=invoke.percentile(99),
        system=SystemStats(load_1m=0.5, cpu_percent=12.0, rss_bytes=50_000_000, temperature_c=48.5),
    )
    return Telemetry(v=PROTOCOL_VERSION, device_id=device_id, boot_id=boot, seq=seq, deployment_id=deployment_id,
                     kind="serving", ts=end, serving=report)


def ingest(db: Database, *messages: Telemetry) -> list[bool]:
    """Apply the messages in one transaction, as the server applies a batch."""
    with db.session() as session:
        return [apply_telemetry(session, message) for message in messages]
