"""Storing serving reports as they arrive, inside the ingest batch's transaction (no commit of its own).

A report is keyed by ``(device_id, boot_id, seq)``: a QoS 1 redelivery or an
agent's resend of a report not yet acknowledged is recognised and counted
once. The per-(profile, model, version) totals grow in the same transaction
as the raw insert, so they always equal everything ever stored.
"""

from __future__ import annotations

from server.db import Session, latency_queries
from server.db.models import Device, ServingReportRecord
from shared.histogram import LatencyHistogram
from shared.messages import Telemetry


def store_serving_report(session: Session, device: Device, message: Telemetry) -> bool:
    """Add the report (once); True when it is stored, now or before."""
    report = message.serving
    if report is None:
        raise ValueError("not serving telemetry")
    if latency_queries.serving_report_seen(session, device.id, message.boot_id, message.seq):
        return True
    invoke = LatencyHistogram.from_wire(report.invoke)
    system = report.system
    session.add(ServingReportRecord(
        device_id=device.id, boot_id=message.boot_id, seq=message.seq, deployment_id=message.deployment_id,
        profile=device.profile_name, model=report.model, version=report.version, sha256=report.sha256,
        quantization=report.quantization, runtime=report.runtime, threads=report.threads, source=report.source,
        start_ts=report.start, end_ts=report.end, calls=report.calls, errors=report.errors, samples=report.samples,
        invoke=invoke.to_json(), e2e=LatencyHistogram.from_wire(report.e2e).to_json(),
        p50_ms=report.p50_ms, p90_ms=report.p90_ms, p99_ms=report.p99_ms,
        load_1m=system.load_1m if system else None, cpu_percent=system.cpu_percent if system else None,
        rss_bytes=system.rss_bytes if system else None, temperature_c=system.temperature_c if system else None,
    ))
    _add_to_totals(session, device.profile_name, report.model, report.version, report.calls, report.errors, invoke)
    return True


def _add_to_totals(session: Session, profile: str, model: str, version: int, calls: int, errors: int,
                   invoke: LatencyHistogram) -> None:
    total = latency_queries.locked_serving_total(session, profile, model, version)
    merged = LatencyHistogram.from_json(total.invoke)
    merged.add(invoke)
    total.calls += calls
    total.errors += errors
    total.invoke = merged.to_json()  # a new value: the JSON column does not track changes inside it
