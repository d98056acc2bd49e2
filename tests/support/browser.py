"""Driving the dashboard in tests: a real headless Chromium (Playwright) and plain HTTP.

`chromium()` launches Debian's Chromium (RUNNER_TEST_CHROMIUM, /usr/bin/chromium by
default) without its sandbox (tests run as root in a container); `sign_in` goes
through the sign-in form as a person would; `screenshot` keeps a picture of a page
under var/screenshots/. `UiClient` is the same dashboard over httpx, signed in through
the same form, for what a browser would never send (forged posts).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, Page, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("RUNNER_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page: Page, api_url: str, key: str, *, then: str = "/ui/") -> None:
    """Sign in through the form; the page ends on `then` (a dashboard path)."""
    page.goto(f"{api_url}/ui/login?next={then}")
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{api_url}{then}")


def screenshot(page: Page, name: str) -> Path:
    """A full-page picture at var/screenshots/<name>.png (made on demand)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def csrf_of(html: str) -> str:
    """The first CSRF token of a page's forms."""
    found = _CSRF.search(html)
    assert found is not None, "no CSRF token on the page"
    return found[1]


class UiClient:
    """The dashboard over HTTP, signed in with `key` through the sign-in form."""

    def __init__(self, api_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=api_url, timeout=30, follow_redirects=False)
        form = self.http.get("/ui/login")
        answer = self.http.post("/ui/login", data={
            "csrf": csrf_of(form.text), "next": "/ui/runs", "key": key})
        assert answer.status_code == 303, (answer.status_code, answer.text[:300])
        self.csrf = csrf_of(self.http.get("/ui/runs").text)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def post(self, path: str, data: dict[str, Any] | None = None,
             **kwargs: Any) -> httpx.Response:
        return self.http.post(path, data=data or {}, **kwargs)

    def close(self) -> None:
        self.http.close()
