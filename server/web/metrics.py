"""``/metrics``: the fleet for Prometheus, read from the database at each scrape.

A custom collector on a registry of its own (not prometheus-client's global one, which would also
export this process's Python internals and could not hold two apps in one test process):

- ``edgefleet_inference_latency_seconds`` (histogram; profile, model, version): on-device invoke times of
  served calls, cumulative since the database was created. Its ``le`` bounds are the power-of-two
  microsecond edges (2 µs to 67 s) of the shared histogram scheme (``shared/histogram.py``), so every count is exact.
- ``edgefleet_inference_calls_total`` and ``edgefleet_inference_errors_total`` (same labels).
- ``edgefleet_devices`` (gauge; profile, status online|offline).
- ``edgefleet_rollouts`` (gauge; state).
- ``edgefleet_ingest_messages_total`` (kind, result): what the server's loop took in (``server.ingest_counters``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from fastapi import APIRouter, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.db import Database, queries
from server.devices import list_devices
from server.ingest_counters import INGEST, IngestCounters
from server.latency import latency_totals
from server.rollouts.states import RolloutState
from shared.histogram import BUCKET_COUNT, BUCKETS_PER_OCTAVE, lower_edge_ms

# every 8th bucket edge is 2**k µs: from 2 µs (a small model's invoke takes a few) to the scheme's last edge
# (about 67 s); +Inf holds the rest
LE_BOUNDS_MS = tuple(lower_edge_ms(i) for i in range(BUCKETS_PER_OCTAVE, BUCKET_COUNT, BUCKETS_PER_OCTAVE))

router = APIRouter(tags=["metrics"], dependencies=[Security(HTTPBearer(auto_error=False))])


def _le(bound_ms: float) -> str:
    return repr(bound_ms / 1000.0)


class FleetCollector(Collector):
    def __init__(self, db: Database, ingest: IngestCounters = INGEST) -> None:
        self.db = db
        self.ingest = ingest

    def collect(self) -> Iterator[Metric]:
        yield from self._latency()
        yield self._devices()
        yield self._rollouts()
        yield self._ingest()

    def _latency(self) -> Iterator[Metric]:
        labels = ["profile", "model", "version"]
        histogram = HistogramMetricFamily("edgefleet_inference_latency_seconds",
                                          "On-device inference (invoke) time of served calls.", labels=labels)
        calls = CounterMetricFamily("edgefleet_inference_calls", "Inference calls served on devices.", labels=labels)
        errors = CounterMetricFamily("edgefleet_inference_errors", "Inference calls that failed on devices.",
                                     labels=labels)
        for total in latency_totals(self.db):
            values = [total.profile, total.model, str(total.version)]
            counts = total.histogram.cumulative(LE_BOUNDS_MS)
            buckets = [(_le(b), float(c)) for b, c in zip(LE_BOUNDS_MS, counts)]
            buckets.append(("+Inf", float(total.histogram.total)))
            histogram.add_metric(values, buckets, sum_value=total.histogram.sum_ms / 1000.0)
            calls.add_metric(values, float(total.calls))
            errors.add_metric(values, float(total.errors))
        yield histogram
        yield calls
        yield errors

    def _devices(self) -> Metric:
        gauge = GaugeMetricFamily("edgefleet_devices", "Registered devices by profile and status.",
                                  labels=["profile", "status"])
        counts = Counter((d.profile, "online" if d.online else "offline") for d in list_devices(self.db))
        for profile in sorted({p for p, _ in counts}):
            for status in ("online", "offline"):
                gauge.add_metric([profile, status], float(counts[profile, status]))
        return gauge

    def _rollouts(self) -> Metric:
        gauge = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by state.", labels=["state"])
        with self.db.reading() as session:
            counts = queries.rollout_state_counts(session)
        for state in RolloutState:
            gauge.add_metric([state.value], float(counts.get(state.value, 0)))
        return gauge

    def _ingest(self) -> Metric:
        counter = CounterMetricFamily("edgefleet_ingest_messages", "Agent messages the server took in.",
                                      labels=["kind", "result"])
        for (kind, result), count in sorted(self.ingest.snapshot().items()):
            counter.add_metric([kind, result], float(count))
        return counter


def fleet_registry(db: Database) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(db))
    return registry


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
