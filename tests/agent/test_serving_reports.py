"""Serving reports: intervals from a fake clock, every call in exactly one report across many intervals,
an outbox backlog (merged intervals), a clean stop and a restart; re-benchmarks; system stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.serving.host import ModelHost, ModelSource
from agent.serving.rebenchmark import Rebenchmark
from agent.serving.recorder import LatencyRecorder
from agent.serving.reporter import MAX_BACKLOG, ServingReporter
from agent.serving.system import SystemSampler
from shared.histogram import LatencyHistogram
from shared.messages import ServingReport, Telemetry, decode_payload, encode_payload
from shared.topics import TopicKind
from tests.agent.fakes import FakeClock
from tests.agent.serving_material import ServedModels

INTERVAL = 10.0
TOPIC = "ef/v1/devices/d/telemetry"


def source(version: int) -> ModelSource:
    return ModelSource(model="clf", version=version, sha256=f"sha-{version}", quantization="int8",
                       deployment_id=f"dep-{version}", model_path="", eval_path="", threads=1)


class Agent:
    """The recorder, the reporter and a real outbox, as AgentService wires them, on fake clocks."""

    def __init__(self, directory: Path, *, boot: str = "boot-1") -> None:
        self.wall, self.mono = FakeClock(1_700_000_000.0), FakeClock(100.0)
        self.boot, self.seq = boot, 0
        self.published: list[bytes] = []
        self.outbox = Outbox(directory, lambda topic, payload: self.published.append(payload), monotonic=self.mono)
        self.recorder = LatencyRecorder(clock=self.wall, monotonic=self.mono)
        self.reporter = ServingReporter(self.recorder.swap, self.send, lambda: self.outbox.waiting("serving"),
                                        interval_s=INTERVAL, monotonic=self.mono,
                                        system=SystemSampler(monotonic=self.mono))

    def send(self, report: ServingReport, deployment_id: str) -> None:
        self.seq += 1
        message = Telemetry(v=1, device_id="d", boot_id=self.boot, seq=self.seq, deployment_id=deployment_id,
                            kind="serving", ts=self.wall(), serving=report)
        self.outbox.send(TOPIC, encode_payload(message), kind="serving")

    def calls(self, n: int, version: int = 1, ms: float = 2.0) -> None:
        for _ in range(n):
            self.recorder.record(source(version), "ai-edge-litert", 1, invoke_ms=ms, e2e_ms=ms * 1.5, samples=2)

    def advance(self, seconds: float) -> None:
        self.wall.advance(seconds)
        self.mono.advance(seconds)
        self.reporter.tick()

    def reports(self) -> list[ServingReport]:
        """Every distinct report published (resends counted once)."""
        seen: dict[tuple[str, int], ServingReport] = {}
        for payload in self.published:
            message = decode_payload(TopicKind.TELEMETRY, payload)
            assert isinstance(message, Telemetry) and message.serving is not None
            seen[(message.boot_id, message.seq)] = message.serving
        return list(seen.values())

    def ack_all(self) -> None:
        for payload in self.published:
            body = json.loads(payload)
            self.outbox.acknowledge(body["boot_id"], (body["seq"],))


def test_one_report_per_version_with_calls_every_interval(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    agent.calls(3, version=1)
    agent.calls(2, version=2, ms=4.0)
    agent.advance(INTERVAL - 1)
    assert agent.published == []  # not yet
    agent.advance(1)
    reports = sorted(agent.reports(), key=lambda r: r.version)
    assert [(r.version, r.calls, r.samples, r.errors, r.source) for r in reports] == [
        (1, 3, 6, 0, "traffic"), (2, 2, 4, 0, "traffic")]
    one = reports[0]
    assert (one.start, one.end) == (1_700_000_000.0, 1_700_000_010.0)
    assert LatencyHistogram.from_wire(one.invoke).total == 3 and one.p50_ms == pytest.approx(2.0, rel=0.1)
    assert one.system is not None and one.system.rss_bytes is not None and one.system.rss_bytes > 0
    agent.advance(INTERVAL)  # an interval without calls sends nothing
    assert len(agent.reports()) == 2


def test_every_call_lands_in_exactly_one_report_through_a_long_outage(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    made = 0
    for interval in range(MAX_BACKLOG + 40):  # nobody acknowledges: the server is away
        agent.calls(interval % 5 + 1)
        made += interval % 5 + 1
        agent.advance(INTERVAL)
    # The backlog stopped growing past the limit: later intervals wait, merged, in one accumulator.
    assert agent.outbox.waiting("serving") == MAX_BACKLOG + 1
    assert agent.reporter.pending_calls > 0
    sent = sum(r.calls for r in agent.reports())
    assert sent + agent.reporter.pending_calls == made
    agent.ack_all()  # the server is back and acknowledges everything
    agent.calls(1)
    made += 1
    agent.advance(INTERVAL)
    assert agent.reporter.pending_calls == 0
    merged = agent.reports()[-1]
    assert merged.end - merged.start > INTERVAL  # one report covering the intervals it merged
    assert sum(r.calls for r in agent.reports()) == made
    assert sum(LatencyHistogram.from_wire(r.invoke).total for r in agent.reports()) == made


def test_a_clean_stop_flushes_into_the_outbox_and_a_restart_sends_it(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    agent.calls(4)
    agent.advance(INTERVAL)
    for _ in range(MAX_BACKLOG + 2):
        agent.calls(1)
        agent.advance(INTERVAL)
    agent.calls(3)
    agent.advance(INTERVAL / 2)
    agent.reporter.flush()  # the agent stops: everything goes into the outbox, backlog or not
    assert agent.reporter.pending_calls == 0
    total = 4 + MAX_BACKLOG + 2 + 3
    assert sum(r.calls for r in agent.reports()) == total

    restarted = Agent(tmp_path, boot="boot-2")
    assert restarted.outbox.replay() == len(agent.reports())
    assert restarted.outbox.waiting("serving") == len(agent.reports())  # the tag survives the restart
    assert sum(r.calls for r in restarted.reports()) == total


def test_errors_are_counted_with_the_calls(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    agent.calls(2)
    agent.recorder.error(source(1), "ai-edge-litert", 1)
    agent.advance(INTERVAL)
    (report,) = agent.reports()
    assert (report.calls, report.errors) == (3, 1)
    assert LatencyHistogram.from_wire(report.invoke).total == 2


def test_a_rebenchmark_runs_only_after_a_quiet_interval_and_says_so(served_models: ServedModels) -> None:
    mono = FakeClock(0.0)
    host, recorder = ModelHost(), LatencyRecorder(monotonic=mono)
    host.want(served_models.source(1))
    assert host.wait_settled(30)
    bench = Rebenchmark(host, recorder, interval_s=60.0, runs=24, monotonic=mono)
    try:
        mono.advance(59)
        bench.tick()
        assert not bench.running and recorder.swap() == []
        recorder.record(served_models.source(1), "ai-edge-litert", 1, invoke_ms=1.0, e2e_ms=1.0, samples=1)
        mono.advance(30)  # 89 s since start, but an application called 30 s ago
        bench.tick()
        assert not bench.running
        mono.advance(30)
        bench.tick()
        bench.join()
        by_origin = {acc.origin: acc for acc in recorder.swap()}
        assert set(by_origin) == {"traffic", "rebenchmark"}
        rebench = by_origin["rebenchmark"]
        assert (rebench.calls, rebench.samples, rebench.errors) == (24, 24, 0)
        assert rebench.invoke.total == 24 and rebench.invoke.sum_ms > 0
        assert recorder.last_traffic == 59.0  # a re-benchmark is not traffic
    finally:
        host.close()


def test_system_stats_read_what_is_readable(tmp_path: Path) -> None:
    for zone, millidegrees in (("thermal_zone0", "41500"), ("thermal_zone1", "55250"), ("thermal_zone2", "x")):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "temp").write_text(millidegrees)
    mono = FakeClock(0.0)
    sampler = SystemSampler(thermal_glob=str(tmp_path / "thermal_zone*" / "temp"), monotonic=mono)
    mono.advance(10)
    stats = sampler.sample()
    assert stats.temperature_c == 55.25
    assert stats.rss_bytes is not None and stats.rss_bytes > 10_000_000
    assert stats.load_1m is not None and stats.load_1m >= 0
    assert stats.cpu_percent is not None and stats.cpu_percent >= 0
    assert SystemSampler(thermal_glob=str(tmp_path / "none*")).sample().temperature_c is None
