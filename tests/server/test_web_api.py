"""The HTTP API, ``/metrics`` and the pages' HTML, through FastAPI's TestClient over a seeded registry
(``web_seed``: three devices, two rollouts, 50 minutes of serving reports)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.ingest_counters import INGEST
from server.web import create_app
from server.web.metrics import LE_BOUNDS_MS
from server.web.problems import BAD_REQUEST, NOT_FOUND, PROBLEM_JSON, UNAVAILABLE
from tests.server.web_seed import SWITCH_AGO_S, Seeded, seeded_copy


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path,
           digits_inputs: tuple[Path, Path]) -> Iterator[Seeded]:
    with seeded_copy(template_data_dir, tmp_path_factory.mktemp("web") / "data", digits_inputs) as seeded:
        yield seeded


@pytest.fixture(scope="module")
def client(seeded: Seeded) -> Iterator[TestClient]:
    with TestClient(create_app(seeded.db, clock=lambda: seeded.now)) as test_client:
        yield test_client


def problem_of(response: object, status: int, type_: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == PROBLEM_JSON  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert body["type"] == type_ and body["status"] == status and body["title"] and body["detail"]
    return body


# -- devices ---------------------------------------------------------------------------------


def test_devices_lists_every_device_with_its_latency_now(client: TestClient) -> None:
    devices = {d["name"]: d for d in client.get("/api/v1/devices").json()}
    assert sorted(devices) == ["cam-1", "cam-2", "pi-1"]
    cam = devices["cam-1"]
    assert cam["profile"] == "x86-64" and cam["active_model"] == "digits" and cam["active_version"] == 2
    assert cam["latency"]["calls_per_s"] == pytest.approx(120 * 6 / 300)  # six reports of 120 end in [now-5m, now]
    assert 0 < cam["latency"]["p50_ms"] <= cam["latency"]["p95_ms"]
    assert devices["pi-1"]["latency"]["p50_ms"] > cam["latency"]["p50_ms"]  # the rpi4 is slower


def test_a_device_has_its_latency_and_recent_deployments(client: TestClient, seeded: Seeded) -> None:
    body = client.get("/api/v1/devices/cam-1").json()
    assert body["device"]["name"] == "cam-1" and body["latency"]["device"] == "cam-1"
    deployments = body["deployments"]
    assert [d["rollout"] for d in deployments] == [seeded.rollouts[1], seeded.rollouts[0]]  # newest first
    assert [(d["model"], d["version"], d["state"]) for d in deployments] == [("digits", 2, "committed"),
                                                                             ("digits", 1, "committed")]


def test_device_latency_defaults_to_the_last_hour_in_at_most_120_steps(client: TestClient, seeded: Seeded) -> None:
    series = client.get("/api/v1/devices/cam-1/latency").json()
    assert series["scope"] == "device" and series["name"] == "cam-1"
    assert series["until"] == seeded.now and series["since"] == seeded.now - 3600
    assert (series["until"] - series["since"]) / series["step_s"] <= 120
    assert sum(p["calls"] for p in series["points"]) == 49 * 120  # [since, until): the report ending now is not in
    assert all(p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] for p in series["points"])
    (change,) = series["changes"]
    assert (change["model"], change["version"], change["previous_version"]) == ("digits", 2, 1)
    assert change["ts"] == pytest.approx(seeded.now - SWITCH_AGO_S, abs=61)
    assert {(v["model"], v["version"]) for v in series["versions"]} == {("digits", 1), ("digits", 2)}


def test_device_latency_takes_relative_and_absolute_ranges(client: TestClient, seeded: Seeded) -> None:
    series = client.get("/api/v1/devices/cam-1/latency", params={"since": "10m", "step": "1m"}).json()
    assert series["step_s"] == 60 and series["since"] == seeded.now - 600
    assert len(series["points"]) == 10 and series["changes"] == []
    absolute = client.get("/api/v1/devices/cam-1/latency",
                          params={"since": str(seeded.now - 600), "until": str(seeded.now), "step": "60"}).json()
    assert absolute["points"] == series["points"]


@pytest.mark.parametrize("params", [
    {"since": "yesterday"}, {"step": "0"}, {"step": "-5m"}, {"since": "1m", "until": "2h"},
    {"since": "30d", "step": "1s"},  # far more than MAX_POINTS steps
])
def test_a_bad_range_is_a_400_problem(client: TestClient, params: dict[str, str]) -> None:
    problem_of(client.get("/api/v1/devices/cam-1/latency", params=params), 400, BAD_REQUEST)


def test_unknown_device_is_a_404_problem(client: TestClient) -> None:
    for path in ("/api/v1/devices/nope", "/api/v1/devices/nope/latency"):
        body = problem_of(client.get(path), 404, NOT_FOUND)
        assert "nope" in str(body["detail"])


# -- profiles ------------------------------------------------------------------------------


def test_profile_latency_merges_its_devices(client: TestClient, seeded: Seeded) -> None:
    series = client.get("/api/v1/profiles/x86-64/latency", params={"step": "1h"}).json()
    assert series["scope"] == "profile" and series["name"] == "x86-64"
    assert sum(p["calls"] for p in series["points"]) == 49 * (120 + 60)  # the reports ending now are not in
    only_v2 = client.get("/api/v1/profiles/x86-64/latency",
                         params={"model": "digits", "version": 2, "until": str(seeded.now + 1)}).json()
    assert [(v["model"], v["version"]) for v in only_v2["versions"]] == [("digits", 2)]
    assert only_v2["versions"][0]["calls"] == seeded.ingested["x86-64", "digits", 2][0]


def test_profile_latency_errors(client: TestClient) -> None:
    problem_of(client.get("/api/v1/profiles/nope/latency"), 404, NOT_FOUND)
    problem_of(client.get("/api/v1/profiles/x86-64/latency", params={"model": "nope"}), 404, NOT_FOUND)
    problem_of(client.get("/api/v1/profiles/x86-64/latency", params={"model": "digits", "version": "two"}), 400,
               BAD_REQUEST)
    problem_of(client.get("/api/v1/profiles/x86-64/latency", params={"version": 0}), 400, BAD_REQUEST)


# -- models --------------------------------------------------------------------------------


def test_models_are_what_model_list_json_prints(client: TestClient, seeded: Seeded) -> None:
    from server.model_read_model import models_json

    body = client.get("/api/v1/models").json()
    assert body == models_json(seeded.db)
    assert [v["version"] for v in body[0]["versions"]] == [1, 2]


def test_model_report_is_what_model_report_json_prints(client: TestClient, seeded: Seeded) -> None:
    from server.model_read_model import reports_json

    body = client.get("/api/v1/models/digits/2/report").json()
    assert body == reports_json(seeded.db, "digits:2")
    (report,) = body
    assert report["profile"] == "x86-64" and report["ships"] == "dynamic_range"
    assert any(v["chosen"] for v in report["variants"])


def test_model_report_errors(client: TestClient) -> None:
    problem_of(client.get("/api/v1/models/nope/1/report"), 404, NOT_FOUND)
    problem_of(client.get("/api/v1/models/digits/9/report"), 404, NOT_FOUND)
    problem_of(client.get("/api/v1/models/digits/latest/report"), 400, BAD_REQUEST)


# -- rollouts and events --------------------------------------------------------------------


def test_rollouts_list_newest_first(client: TestClient, seeded: Seeded) -> None:
    body = client.get("/api/v1/rollouts").json()
    assert [r["rollout"] for r in body] == [seeded.rollouts[1], seeded.rollouts[0]]
    assert body[1]["committed"] == 2
    problem_of(client.get("/api/v1/rollouts", params={"limit": 0}), 400, BAD_REQUEST)


def test_a_rollout_has_waves_gates_devices_and_before_after_latency(client: TestClient, seeded: Seeded) -> None:
    body = client.get(f"/api/v1/rollouts/{seeded.rollouts[1]}").json()
    assert (body["model"], body["version"]) == ("digits", 2)
    (wave,) = body["waves"]
    assert wave["gates"] and {"name", "measured", "threshold", "passed"} <= set(wave["gates"][0])
    assert [d["device"] for d in body["devices"]] == ["cam-1"]
    before_after = body["latency"]["by_profile"]["x86-64"]
    assert before_after["before"]["calls"] > 0 and before_after["after"]["calls"] > 0
    assert before_after["ratio_p95"] < 1  # digits:2 is faster in the seeded traffic
    assert set(body["latency"]["by_device"]) == {"cam-1"}


def test_unknown_rollout_is_a_404_problem(client: TestClient) -> None:
    problem_of(client.get("/api/v1/rollouts/r-nope"), 404, NOT_FOUND)


def test_events_are_the_audit_log(client: TestClient, seeded: Seeded) -> None:
    everything = client.get("/api/v1/events", params={"limit": 1000}).json()
    assert any(e["kind"] == "device.registered" and e["device"] == "pi-1" for e in everything)
    assert len(client.get("/api/v1/events", params={"limit": 3}).json()) == 3
    of_rollout = client.get("/api/v1/events", params={"rollout": seeded.rollouts[1]}).json()
    assert of_rollout and all(e["rollout"] == seeded.rollouts[1] for e in of_rollout)
    of_device = client.get("/api/v1/events", params={"device": "pi-1"}).json()
    assert of_device and all(e["device"] == "pi-1" for e in of_device)
    assert client.get("/api/v1/events", params={"since": str(seeded.now + 3600)}).json() == []
    assert client.get("/api/v1/events", params={"since": "1h"}).json()  # all of them are recent


def test_events_errors(client: TestClient) -> None:
    problem_of(client.get("/api/v1/events", params={"limit": "many"}), 400, BAD_REQUEST)
    problem_of(client.get("/api/v1/events", params={"since": "soon"}), 400, BAD_REQUEST)
    problem_of(client.get("/api/v1/events", params={"device": "nope"}), 404, NOT_FOUND)
    problem_of(client.get("/api/v1/events", params={"rollout": "r-nope"}), 404, NOT_FOUND)


def test_an_unknown_api_path_is_a_404_problem(client: TestClient) -> None:
    problem_of(client.get("/api/v1/nothing"), 404, NOT_FOUND)


def test_a_database_failure_is_a_503_problem(seeded: Seeded, tmp_path: Path) -> None:
    from server.db import open_database

    broken = open_database(f"sqlite:///{tmp_path / 'missing' / 'edgefleet.db'}")  # its directory does not exist
    with TestClient(create_app(broken)) as broken_client:
        problem_of(broken_client.get("/api/v1/devices"), 503, UNAVAILABLE)
        problem_of(broken_client.get("/metrics"), 503, UNAVAILABLE)
    broken.close()


# -- OpenAPI, health -------------------------------------------------------------------------


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/api/v1/devices", "/api/v1/devices/{name}", "/api/v1/devices/{name}/latency",
        "/api/v1/profiles/{name}/latency", "/api/v1/models", "/api/v1/models/{name}/{version}/report",
        "/api/v1/rollouts", "/api/v1/rollouts/{rollout_id}", "/api/v1/events", "/metrics", "/healthz",
    } <= set(paths)
    assert "/devices/{name}" not in paths  # pages are not API
    assert client.get("/docs").status_code == 200
    assert client.get("/healthz").json() == {"ok": True}


# -- /metrics ----------------------------------------------------------------------------------


def _families(client: TestClient) -> dict[str, object]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def test_metrics_histogram_counts_are_exactly_what_was_ingested(client: TestClient, seeded: Seeded) -> None:
    families = _families(client)
    latency = families["edgefleet_inference_latency_seconds"]
    assert latency.type == "histogram"  # type: ignore[attr-defined]
    samples = latency.samples  # type: ignore[attr-defined]
    seen = set()
    for (profile, model, version), (calls, errors, histogram) in seeded.ingested.items():
        labels = {"profile": profile, "model": model, "version": str(version)}
        mine = [s for s in samples if {k: s.labels.get(k) for k in labels} == labels]
        buckets = {float(s.labels["le"]): s.value for s in mine if s.name.endswith("_bucket")}
        assert [buckets[b / 1000] for b in LE_BOUNDS_MS] == histogram.cumulative(LE_BOUNDS_MS)
        assert buckets[float("inf")] == histogram.total == calls - errors
        (count,) = [s.value for s in mine if s.name.endswith("_count")]
        (total,) = [s.value for s in mine if s.name.endswith("_sum")]
        assert count == histogram.total and total == pytest.approx(histogram.sum_ms / 1000)
        seen.add((profile, model, str(version)))
    assert {(s.labels["profile"], s.labels["model"], s.labels["version"]) for s in samples} == seen
    errors_family = families["edgefleet_inference_errors"]
    assert {s.labels["profile"] + s.labels["version"]: s.value for s in errors_family.samples  # type: ignore[attr-defined]
            if s.name.endswith("_total")} == {p + str(v): e for (p, _, v), (_, e, _) in seeded.ingested.items()}


def test_metrics_devices_rollouts_and_ingest(client: TestClient, seeded: Seeded) -> None:
    families = _families(client)
    devices = {(s.labels["profile"], s.labels["status"]): s.value
               for s in families["edgefleet_devices"].samples}  # type: ignore[attr-defined]
    assert devices == {("x86-64", "online"): 2, ("x86-64", "offline"): 0, ("rpi4", "online"): 0,
                       ("rpi4", "offline"): 1}
    rollouts = {s.labels["state"]: s.value for s in families["edgefleet_rollouts"].samples}  # type: ignore[attr-defined]
    assert rollouts["succeeded"] == 2 and sum(rollouts.values()) == 2
    INGEST.count([("telemetry", "stored"), ("telemetry", "duplicate"), ("nonsense", "malformed")])
    ingest = {(s.labels["kind"], s.labels["result"]): s.value
              for s in _families(client)["edgefleet_ingest_messages"].samples  # type: ignore[attr-defined]
              if s.name.endswith("_total")}
    assert ingest[("telemetry", "duplicate")] >= 1 and ingest[("nonsense", "malformed")] >= 1


def test_new_reports_show_in_the_next_scrape(client: TestClient, seeded: Seeded) -> None:
    def count() -> float:
        samples = _families(client)["edgefleet_inference_latency_seconds"].samples  # type: ignore[attr-defined]
        return next(s.value for s in samples if s.name.endswith("_count") and s.labels["profile"] == "rpi4")

    before = count()
    seeded.serve("pi-1", "digits", 1, seeded.now - 1, seeded.now, calls=7)
    assert count() == before + 7


# -- pages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/devices/cam-1", "/rollouts/{rollout}", "/models/digits/2"])
def test_pages_are_html_shells_that_load_no_cdn(client: TestClient, seeded: Seeded, path: str) -> None:
    response = client.get(path.format(rollout=seeded.rollouts[0]))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "/static/vendor/uplot/uPlot.iife.min.js" in page and "/static/dashboard.js" in page
    assert "http://" not in page and "https://" not in page


@pytest.mark.parametrize("path", ["/devices/nope", "/rollouts/r-nope", "/models/nope/1", "/no/such/page"])
def test_unknown_pages_are_a_404_page(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    assert "Not found" in response.text


def test_the_404_page_escapes_the_path(client: TestClient) -> None:
    response = client.get("/devices/<script>alert(1)</script>")
    assert response.status_code == 404 and "<script>alert" not in response.text


def test_static_assets_are_served(client: TestClient) -> None:
    for path in ("/static/dashboard.js", "/static/dashboard.css", "/static/vendor/uplot/uPlot.iife.min.js",
                 "/static/vendor/uplot/uPlot.min.css", "/static/vendor/uplot/LICENSE"):
        assert client.get(path).status_code == 200, path


def test_the_grafana_dashboard_queries_only_metrics_we_export(client: TestClient) -> None:
    import json
    import re

    dashboard = json.loads((Path(__file__).parents[2] / "deploy/grafana/edgefleet-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"edgefleet_[a-z_]+", expr)}
    exported = {s.name for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
    assert used and used <= exported, used - exported
    assert any("histogram_quantile(0.95" in e for e in exprs)
