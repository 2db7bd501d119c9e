"""The dashboard in a real browser: WebServer on a free port over a seeded registry, driven by headless
Chromium (Playwright with Debian's ``/usr/bin/chromium``; browsers are never downloaded).

Screenshots go to ``test-artifacts/`` at the repository root, or to ``$EDGEFLEET_TEST_ARTIFACTS``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.web import WebServer
from tests.browser import CHROMIUM, TIMEOUT_MS, checked_page, chromium, screenshot, wait_updates
from tests.server.web_seed import Seeded, seeded_copy

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (Debian package 'chromium'); "
                                "CI installs it")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, template_data_dir: Path,
           digits_inputs: tuple[Path, Path]) -> Iterator[Seeded]:
    with seeded_copy(template_data_dir, tmp_path_factory.mktemp("browser") / "data", digits_inputs) as seeded:
        yield seeded


@pytest.fixture(scope="module")
def server(seeded: Seeded) -> Iterator[WebServer]:
    web = WebServer(seeded.db, "127.0.0.1", 0).start()
    yield web
    web.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def console_errors() -> list[str]:
    return []


@pytest.fixture
def page(browser: object, console_errors: list[str]) -> Iterator[object]:
    with checked_page(browser, console_errors) as opened:
        yield opened


def test_the_overview_lists_the_devices_by_profile(page: object, server: WebServer) -> None:
    page.goto(server.url)  # type: ignore[attr-defined]
    wait_updates(page, 1)
    rows = page.locator("#devices tbody tr")  # type: ignore[attr-defined]
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-device") for i in range(3)] == ["cam-1", "cam-2", "pi-1"]
    assert page.locator("#devices tr[data-device=cam-1] .badge").inner_text() == "online"  # type: ignore[attr-defined]
    assert page.locator("#devices tr[data-device=pi-1] .badge").inner_text() == "offline"  # type: ignore[attr-defined]
    cards = page.locator("#profiles .card")  # type: ignore[attr-defined]
    assert sorted(cards.nth(i).get_attribute("data-profile") for i in range(cards.count())) == ["rpi4", "x86-64"]
    assert "p95 digits:2" in page.locator("#profiles .card[data-profile=x86-64]").inner_text()  # type: ignore
    assert page.locator("#rollouts tbody tr").count() == 2  # type: ignore[attr-defined]
    screenshot(page, "dashboard-fleet.png")


def test_a_device_page_draws_its_latency_chart_with_the_model_change(page: object, server: WebServer,
                                                                      seeded: Seeded) -> None:
    page.goto(server.url + "devices/cam-1")  # type: ignore[attr-defined]
    wait_updates(page, 1)
    assert page.locator("#latency-chart canvas").count() == 1  # type: ignore[attr-defined]
    chart = page.evaluate("""() => {  // the uPlot instance's data and the markers it draws
        const u = window.edgefleet.charts["latency-chart"];
        return {series: u.series.map(s => s.label), points: u.data[0].length,
                drawn: u.data[1].filter(v => v !== null).length, width: u.width,
                markers: window.edgefleet.markers.map(m => ({ts: m.ts, label: m.label,
                        x: u.valToPos(m.ts, "x")}))};
    }""")  # type: ignore[attr-defined]
    assert chart["series"][1:] == ["p50 ms", "p90 ms", "p99 ms"]
    assert chart["points"] == chart["drawn"] >= 45  # one per minute of the last 50, in 30 s steps
    (marker,) = chart["markers"]
    assert marker["label"] == "digits:2" and 0 < marker["x"] < chart["width"]
    assert page.locator("#versions tbody tr").count() == 2  # type: ignore[attr-defined]
    screenshot(page, "dashboard-device.png")


def test_new_reports_appear_without_a_reload(page: object, server: WebServer, seeded: Seeded) -> None:
    page.goto(server.url + "devices/pi-1")  # type: ignore[attr-defined]
    wait_updates(page, 1)
    page.evaluate("window.edgefleet.marker = 'same page'")  # type: ignore[attr-defined]
    count = "() => window.edgefleet.data.series.versions.reduce((n, v) => n + v.calls, 0)"
    before = page.evaluate(count)  # type: ignore[attr-defined]
    import time

    now = time.time()
    seeded.serve("pi-1", "digits", 1, now - 30, now - 1, calls=500)
    page.wait_for_function(f"({count})() >= {before + 500}", timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
    assert page.evaluate("window.edgefleet.marker") == "same page"  # type: ignore[attr-defined]


def test_a_rollout_page_shows_waves_gates_and_before_after(page: object, server: WebServer, seeded: Seeded) -> None:
    page.goto(server.url + f"rollouts/{seeded.rollouts[1]}")  # type: ignore[attr-defined]
    wait_updates(page, 1)
    gates = page.locator(".wave .gates tbody tr[data-gate]")  # type: ignore[attr-defined]
    assert gates.count() >= 1
    assert page.locator(".wave .gate-pass").count() == gates.count()  # type: ignore[attr-defined]
    row = page.locator("#before-after tr[data-profile=x86-64] td")  # type: ignore[attr-defined]
    assert row.count() == 8 and row.nth(7).inner_text() not in ("", "–")
    assert page.locator("#rollout-devices tr[data-device=cam-1]").count() == 1  # type: ignore[attr-defined]
    screenshot(page, "dashboard-rollout.png")


def test_a_model_page_shows_its_compression_report(page: object, server: WebServer) -> None:
    page.goto(server.url + "models/digits/1")  # type: ignore[attr-defined]
    wait_updates(page, 1)
    profiles = page.locator("#reports section.report")  # type: ignore[attr-defined]
    assert profiles.count() == 3
    assert page.locator("#reports tr.chosen").count() == 3  # type: ignore[attr-defined]
    screenshot(page, "dashboard-model.png")


def test_an_unknown_device_is_a_404_page(page: object, server: WebServer, console_errors: list[str]) -> None:
    response = page.goto(server.url + "devices/nope")  # type: ignore[attr-defined]
    assert response.status == 404
    assert "unknown device 'nope'" in page.inner_text("main")  # type: ignore[attr-defined]
    assert all("404" in e for e in console_errors)
    console_errors.clear()  # the browser's note of the 404 itself


def test_a_login_through_the_form_opens_the_dashboard(page: object, seeded: Seeded, console_errors: list[str]) -> None:
    """With auth on (--auth here; beyond loopback it always is), the browser lands on the login page, a bad
    token is refused there, a read token opens the dashboard, whose fetches then carry the HttpOnly cookie;
    "Log out" drops it, and a token revoked under an open page sends it back to the login page."""
    from server.api_tokens import Scope, create_token, revoke_token
    from server.web.auth import COOKIE

    token = create_token(seeded.db, "browser", Scope.READ, actor="operator test@host").token
    web = WebServer(seeded.db, "127.0.0.1", 0, auth=True).start()
    try:
        page.goto(web.url + "devices/cam-1")  # type: ignore[attr-defined]
        assert page.url == web.url + "login?next=/devices/cam-1"  # type: ignore[attr-defined]
        page.fill("#token", "eft_000000000000_" + "A" * 43)  # type: ignore[attr-defined]
        page.click("form.login-form button[type=submit]")  # type: ignore[attr-defined]
        assert "not valid" in page.locator("#login-error").inner_text()  # type: ignore[attr-defined]
        screenshot(page, "dashboard-login.png")
        page.fill("#token", token)  # type: ignore[attr-defined]
        page.click("form.login-form button[type=submit]")  # type: ignore[attr-defined]
        page.wait_for_url(web.url + "devices/cam-1", timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
        wait_updates(page, 2)  # the API answered dashboard.js twice, with the cookie
        assert page.locator("#latency-chart canvas").count() == 1  # type: ignore[attr-defined]
        assert page.locator("#versions tbody tr").count() == 2  # type: ignore[attr-defined]
        assert page.locator("header form.session").inner_text().startswith("browser")  # type: ignore[attr-defined]
        (cookie,) = [c for c in page.context.cookies() if c["name"] == COOKIE]  # type: ignore[attr-defined]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain HTTP here
        assert page.evaluate("document.cookie") == ""  # type: ignore[attr-defined]  # no script can read it
        page.click("header form.session button")  # type: ignore[attr-defined]
        page.wait_for_url(web.url + "login", timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
        assert not [c for c in page.context.cookies() if c["name"] == COOKIE]  # type: ignore[attr-defined]

        page.goto(web.url + "login?next=/")  # type: ignore[attr-defined]
        page.fill("#token", token)  # type: ignore[attr-defined]
        page.click("form.login-form button[type=submit]")  # type: ignore[attr-defined]
        page.wait_for_url(web.url, timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
        wait_updates(page, 1)
        revoke_token(seeded.db, "browser", actor="operator test@host")
        page.wait_for_url(web.url + "login?next=%2F", timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
        # the one expected error: the refused poll that sent the page to the login form
        assert [e for e in console_errors if "401" in e] and not [e for e in console_errors if "401" not in e]
        console_errors.clear()
    finally:
        web.stop()
