"""Property: compaction, at any time and in any batch size, neither loses nor doubles a call or a bucket count,
and a range query over the raw/rollup boundary counts every report once (a bare database, no model built)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete

from server.db import Database, latency_queries, open_database, sqlite_url
from server.db.models import Device, ServingReportRecord, ServingRollup, ServingTotal
from server.latency.retention import compact
from server.latency.stats import Accumulator
from server.latency.store import store_serving_report
from shared.histogram import LatencyHistogram
from tests.server.latency_helpers import serving

T0 = 1_699_999_200.0
DEVICES = [Device(id=f"d-{i}", name=f"cam-{i}", profile_name="x86-64") for i in range(3)]  # never added: read only


@pytest.fixture(scope="module")
def bare_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    root: Path = tmp_path_factory.mktemp("latency-props")
    db = open_database(sqlite_url(root))
    db.upgrade()
    yield db
    db.close()


def _everything(db: Database) -> tuple[int, int, LatencyHistogram, LatencyHistogram]:
    with db.reading() as session:
        acc = Accumulator()
        for s in latency_queries.serving_slices(session, since=0, until=T0 * 2):
            acc.add_report(s.calls, s.errors, s.samples, s.invoke, s.e2e, s.source)
        return acc.calls, acc.samples, acc.invoke, acc.e2e


reports = st.lists(
    st.tuples(st.integers(0, 2), st.floats(0, 3 * 86400), st.lists(st.floats(0.01, 5000), max_size=6),
              st.integers(0, 3), st.sampled_from(["traffic", "rebenchmark"]), st.integers(1, 2)),
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reports=reports, now_offset=st.floats(0, 4 * 86400), step=st.sampled_from([60.0, 300.0, 3600.0]),
       batch=st.integers(1, 7), split=st.floats(0, 3 * 86400))
def test_compaction_preserves_every_count(bare_db: Database, reports: list[tuple[int, float, list[float], int, str, int]],
                                          now_offset: float, step: float, batch: int, split: float) -> None:
    with bare_db.session() as session:
        for table in (ServingReportRecord, ServingRollup, ServingTotal):
            session.execute(delete(table))
        for seq, (device, offset, samples, errors, source, version) in enumerate(reports):
            message = serving(DEVICES[device].id, seq, samples, end=T0 + offset, errors=errors, source=source,
                              version=version)
            store_serving_report(session, DEVICES[device], message)
    before = _everything(bare_db)
    now = T0 + now_offset
    compact(bare_db, now, raw_retention_s=86400, rollup_step_s=step, rollup_retention_s=100 * 86400, batch=batch)
    assert _everything(bare_db) == before
    # a range split anywhere, on a rollup step, counts every report once between its two halves
    cut = T0 + (split // step) * step
    with bare_db.reading() as session:
        halves = [latency_queries.serving_slices(session, since=a, until=b) for a, b in ((0, cut), (cut, T0 * 2))]
        assert sum(s.calls for half in halves for s in half) == before[0]
        raw = sum(1 for half in halves for s in half if s.start_ts != s.end_ts)
    assert raw == sum(1 for _, offset, *_ in reports if T0 + offset >= now - 86400)
