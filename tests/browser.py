"""Headless Chromium for the dashboard's browser tests (Playwright driving Debian's ``/usr/bin/chromium``;
browsers are never downloaded). Screenshots go to ``test-artifacts/`` at the repository root, or to
``$EDGEFLEET_TEST_ARTIFACTS``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("EDGEFLEET_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")
TIMEOUT_MS = 15_000


@contextmanager
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


@contextmanager
def checked_page(browser: object, errors: list[str]) -> Iterator[object]:
    """A page that fails the test on any script error, failed fetch, or request leaving 127.0.0.1."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    opened = context.new_page()
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    outside: list[str] = []
    opened.on("request", lambda request: outside.append(request.url)
              if not request.url.startswith("http://127.0.0.1") else None)
    yield opened
    context.close()
    assert errors == [], errors  # no script error, no failed fetch
    assert outside == [], outside  # nothing from a CDN or anywhere else


def screenshot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    return path


def wait_updates(page: object, at_least: int) -> None:
    page.wait_for_function(f"window.edgefleet && window.edgefleet.updates >= {at_least}",  # type: ignore[attr-defined]
                           timeout=TIMEOUT_MS)
