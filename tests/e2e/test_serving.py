"""End to end: applications call an agent's endpoint while a rollout replaces its model.

A real Mosquitto, the server (with its HTTP API and dashboard) and two agent
processes. A load generator calls each agent's local endpoint without pause
(JSON and ``.npy`` bodies) while version 2 is rolled out, while the broker is
restarted and while the server is killed and restarted. Every call must
succeed, each answer comes from version 1 until the commit and from version
2 after it (never back), and the server ends up with exactly as many calls
for each device as the load generator made. Then headless Chromium opens the
dashboard on that real data: the overview lists the devices, a device page
draws its latency chart with a model-change marker, a rollout page shows its
gates; screenshots go to the test-artifacts folder. Last, an agent killed
(SIGKILL) just after writing a serving report to its outbox sends it again
on restart and the server counts it once.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import InferenceClient
from server.broker import Mosquitto, free_port
from tests.browser import CHROMIUM, checked_page, chromium, screenshot, wait_updates
from tests.e2e.fleet import QUICK_AGENT_TOML, Fleet, cli, expect_state, wait_for

pytestmark = pytest.mark.e2e

AGENTS = (("cam-1", "rpi4"), ("cam-2", "x86-64"))
MIN_TRAFFIC_S = 25.0  # the calls of the rollout test span at least two of the dashboard's 10 s steps


@dataclass
class Load:
    """One application calling one agent's endpoint as fast as it answers."""

    client: InferenceClient
    samples: np.ndarray
    tolerate: bool = False  # keep calling through failures (the agent is being killed)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the version of every answer, in order
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            batch = self.samples[i % len(self.samples)][np.newaxis, ...]
            try:
                result = self.client.infer(batch, binary=bool(i % 2))
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(f"call {i}: {exc}")
                self.failed_at.append(time.time())
                if not self.tolerate:
                    time.sleep(0.1)
            else:
                assert result.outputs.shape[0] == 1
                self.ok += 1
                self.answered_at.append(time.time())
                self.versions.append(result.version)
            i += 1
            time.sleep(0.005)

    def start(self) -> Load:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def finish(self) -> None:
        """Stop calling and close the connection; again is a no-op (the ``loads`` fixture calls it after a
        failed test, so no thread keeps a socket open into later tests)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.client.close()


@pytest.fixture
def loads() -> Iterator[Callable[..., Load]]:
    """Start a ``Load``; every one started is finished when the test ends, whatever happened in it."""
    started: list[Load] = []

    def start(client: InferenceClient, samples: np.ndarray, **options: Any) -> Load:
        started.append(Load(client, samples, **options).start())
        return started[-1]

    yield start
    for load in started:
        load.finish()


def api(fleet: Fleet, path: str) -> Any:
    with urllib.request.urlopen(f"{fleet.dashboard}{path}", timeout=10) as response:
        return json.load(response)


def server_calls(fleet: Fleet, device: str) -> int:
    series = api(fleet, f"/api/v1/devices/{device}/latency?since=2h&step=1h")
    return sum(point["calls"] for point in series["points"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, digits_inputs: tuple[Path, Path]) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("serving")
    fleet = Fleet(root, Mosquitto(root / "broker").start(), root / "server")
    try:
        cli("init", "--data-dir", str(fleet.data_dir), "--release-key", "online")
        for name, profile in AGENTS:
            fleet.register(name, profile, extra_toml=QUICK_AGENT_TOML, serve_report_interval_s=1.0)
            fleet.start_agent(name)
        fleet.devices = {n: str(row["id"]) for n, row in fleet.device_list().items()}
        fleet.dashboard = f"http://127.0.0.1:{free_port()}"
        fleet.start_server()
        fleet.wait_online(*(name for name, _ in AGENTS))
        model, evalset = digits_inputs
        cli("model", "add", "digits", "--file", str(model), "--eval", str(evalset), "--data-dir", str(fleet.data_dir))
        first = cli("rollout", "start", "digits", "--profile", "rpi4", "--profile", "x86-64",
                    "--data-dir", str(fleet.data_dir)).strip()
        expect_state(fleet.wait_settled(first), "succeeded")
        yield fleet
    finally:
        fleet.stop()
        fleet.broker.stop()


def endpoint(fleet: Fleet, name: str, *, version: int = 1) -> InferenceClient:
    serve_file = fleet.agent_dirs[name] / "serve.json"
    wait_for(serve_file.exists, 30, f"{name}'s endpoint")
    client = InferenceClient.from_serve_file(str(serve_file), timeout=30)
    try:
        wait_for(lambda: client.healthz() and client.model().get("version") == version, 60,
                 f"{name} to serve version {version}")
    except BaseException:
        client.close()
        raise
    return client


def test_calls_during_a_rollout_never_fail_and_every_call_reaches_the_server(
    fleet: Fleet, digits_inputs: tuple[Path, Path], loads: Callable[..., Load]
) -> None:
    model, evalset = digits_inputs
    samples = np.load(evalset)["x"][:32]
    running = {name: loads(endpoint(fleet, name), samples) for name, _ in AGENTS}
    traffic_started = time.monotonic()
    wait_for(lambda: all(load.ok > 50 for load in running.values()), 60, "traffic on every endpoint")

    cli("model", "add", "digits", "--file", str(model), "--eval", str(evalset), "--data-dir", str(fleet.data_dir))
    # The same network again, its trial timed while this test's traffic and the other agents share two cores:
    # a 15 µs p95 then measures the scheduler, not the model (CI once saw 8.5x). This test is about serving,
    # so the latency ratio gate is set out of the way; tests/e2e/test_rollouts.py tests that gate.
    second = cli("rollout", "start", "digits:2", "--profile", "rpi4", "--profile", "x86-64", "--waves", "1,100%",
                 "--max-latency-ratio", "1000", "--data-dir", str(fleet.data_dir)).strip()
    time.sleep(2)
    fleet.broker.kill()  # a broker crash: what it had not saved is gone, the agents' outboxes still hold it
    time.sleep(1)  # the endpoints keep answering meanwhile
    fleet.restart_broker()
    fleet.kill("server")  # and the server dies mid-rollout: the broker queues the reports for it
    time.sleep(2)
    fleet.start_server()
    expect_state(fleet.wait_settled(second), "succeeded")
    wait_for(lambda: all(load.versions and load.versions[-1] == 2 for load in running.values()), 60,
             "every endpoint to answer with version 2")
    # At least MIN_TRAFFIC_S of calls in all, so the dashboard test below has several chart steps to draw.
    time.sleep(max(1.5, MIN_TRAFFIC_S - (time.monotonic() - traffic_started)))
    for load in running.values():
        load.finish()

    for name, load in running.items():
        assert load.failures == [], f"{name}: {load.failures[:5]}"
        switched = load.versions.index(2)
        assert set(load.versions[:switched]) == {1} and set(load.versions[switched:]) == {2}, name
    # every call the applications made is counted once on the server (reports are sent every second)
    for name, load in running.items():
        wait_for(lambda n=name, c=load.ok: server_calls(fleet, n) == c, 60,
                 f"the server to count {load.ok} calls for {name} (it has {server_calls(fleet, name)})")
    device = api(fleet, f"/api/v1/devices/{AGENTS[0][0]}/latency?since=2h")
    assert [(c["previous_version"], c["version"]) for c in device["changes"]] == [(1, 2)]
    assert {v["version"] for v in device["versions"]} == {1, 2}


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian package 'chromium'); CI installs it")
def test_the_dashboard_shows_the_real_fleet_in_a_browser(fleet: Fleet) -> None:
    """After the traffic above: real reports from real agents, drawn by headless Chromium."""
    name = AGENTS[0][0]
    rollouts = api(fleet, "/api/v1/rollouts")
    errors: list[str] = []
    with chromium() as browser, checked_page(browser, errors) as page:
        page.goto(fleet.dashboard + "/")  # type: ignore[attr-defined]
        wait_updates(page, 1)
        listed = page.locator("#devices tbody tr")  # type: ignore[attr-defined]
        assert sorted(listed.nth(i).get_attribute("data-device") for i in range(listed.count())) == sorted(
            n for n, _ in AGENTS)
        screenshot(page, "e2e-fleet.png")

        page.goto(f"{fleet.dashboard}/devices/{name}")  # type: ignore[attr-defined]
        wait_updates(page, 1)
        # The 15-minute range draws 10 s steps: the traffic above lasted MIN_TRAFFIC_S, so at least two.
        page.get_by_role("button", name="15m", exact=True).click()  # type: ignore[attr-defined]
        page.wait_for_function(  # type: ignore[attr-defined]
            """() => window.edgefleet.charts["latency-chart"].data[1].filter(v => v !== null).length >= 2""",
            timeout=15_000)
        chart = page.evaluate("""() => {
            const u = window.edgefleet.charts["latency-chart"];
            return {drawn: u.data[1].filter(v => v !== null).length, width: u.width,
                    markers: window.edgefleet.markers.map(m => ({label: m.label, x: u.valToPos(m.ts, "x")}))};
        }""")  # type: ignore[attr-defined]
        assert chart["drawn"] >= 2, chart  # points from the calls of both versions
        (marker,) = chart["markers"]
        assert marker["label"] == "digits:2" and 0 <= marker["x"] <= chart["width"], chart
        screenshot(page, "e2e-device.png")

        latest = max(rollouts, key=lambda r: r["created_at"])
        page.goto(f"{fleet.dashboard}/rollouts/{latest['rollout']}")  # type: ignore[attr-defined]
        wait_updates(page, 1)
        assert page.locator(".wave .gates tbody tr[data-gate]").count() >= 1  # type: ignore[attr-defined]
        heads = page.locator(".wave .wave-head .muted")  # type: ignore[attr-defined]
        # waves "1,100%" of two devices: one device each (the second wave's size counts the first's too)
        assert [heads.nth(i).inner_text() for i in range(heads.count())] == ["1/1 committed", "1/1 committed"]
        screenshot(page, "e2e-rollout.png")


def test_an_agent_killed_after_writing_a_report_counts_it_once_and_loses_at_most_its_open_interval(
    fleet: Fleet, digits_inputs: tuple[Path, Path], loads: Callable[..., Load]
) -> None:
    """SIGKILL 300 ms after the agent wrote its third serving report to the outbox (published, maybe not yet
    acknowledged): the restarted agent sends it again and the server counts it once. The calls answered after
    that report's interval closed were only in memory: those are the only ones that may be missing."""
    name = AGENTS[1][0]
    serve_file = fleet.agent_dirs[name] / "serve.json"
    fleet.stop_process(name)  # a clean stop: its last interval is flushed, and serve.json removed
    assert not serve_file.exists()
    baseline = wait_for(lambda: stable_calls(fleet, name), 60, "the server's count to settle")
    fleet.start_agent(name, failpoints="agent.report.written=kill@3+300ms")
    load = loads(endpoint(fleet, name, version=2), np.load(digits_inputs[1])["x"][:32], tolerate=True)
    assert fleet.wait_killed(name, timeout=90) == -9
    wait_for(lambda: load.failures, 30, "the endpoint to go away with its agent")
    load.finish()
    killed_at = load.failed_at[0]
    fleet.start_agent(name)  # replays the outbox
    fleet.wait_online(name)

    counted = wait_for(lambda: stable_calls(fleet, name), 90, "the server's count to settle") - baseline
    answered_before = sum(1 for ts in load.answered_at if ts < killed_at - 1.5)  # surely in a closed interval
    assert answered_before > 0
    assert answered_before <= counted <= load.ok, (answered_before, counted, load.ok)


def stable_calls(fleet: Fleet, name: str, quiet_s: float = 3.0) -> int | None:
    """The server's count for ``name`` once it has not moved for ``quiet_s``; None while it still moves."""
    first = server_calls(fleet, name)
    time.sleep(quiet_s)
    return first if server_calls(fleet, name) == first else None
