"""The web dashboard (`/ui/`, docs/dashboard.md) in a real headless Chromium, against the
real API, worker, Redis and PostgreSQL; forged requests over plain HTTP.

One browser serves the whole module (a launch costs seconds on a small machine); each
test opens its own context, so cookies never leak from one test to the next. Every
page is photographed to var/screenshots/.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from runner.client import RunnerClient
from runner.control.keys import Keys
from runner.control.lifecycle import Lifecycle
from runner.control.store import Store, encode_cursor
from runner.domain import ErrorCode, Role, RunStatus
from runner.manifest import ManifestSource
from runner.settings import Settings
from tests.integration.conftest import WorkerProcess, submit_parked
from tests.support.browser import UiClient, chromium, screenshot, sign_in
from tests.support.waiting import wait_until

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SCRIPT = "<script>alert(1)</script>"
UI_TIMEOUT_MS = 60_000  # a run is queued, started and ended meanwhile on a 2-core box


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page_as(browser: Browser, api_url: str, keys: dict[str, str]
            ) -> Iterator[Callable[..., Page]]:
    """A fresh browser context signed in with the key of `role`, on `then`."""
    contexts = []

    def go(role: str, then: str = "/ui/") -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        sign_in(page, api_url, keys[role], then=then)
        return page

    yield go
    for context in contexts:
        context.close()


@pytest.fixture
def ui_as(api_url: str, keys: dict[str, str]) -> Iterator[Callable[[str], UiClient]]:
    made: list[UiClient] = []

    def go(role: str) -> UiClient:
        made.append(UiClient(api_url, keys[role]))
        return made[-1]

    yield go
    for client in made:
        client.close()


def nonce() -> str:
    return secrets.token_hex(6)


def no_reload_marker(page: Page) -> None:
    """Mark the document: the mark is gone if the page reloads."""
    page.evaluate("window.__stayed = true")


def stayed(page: Page) -> bool:
    return bool(page.evaluate("window.__stayed === true"))


def test_sign_in_shows_the_tenant_and_role_on_every_page(
        browser: Browser, api_url: str, keys: dict[str, str], worker: WorkerProcess,
        settings: Settings, run_and_wait: Callable[..., dict[str, Any]]) -> None:
    run_and_wait("echo", {"n": nonce()})  # something for the charts
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{api_url}/ui/")
    assert page.url.startswith(f"{api_url}/ui/login")  # not signed in: to the form
    screenshot(page, "login")
    page.fill("#key", "rk_nothere_wrongsecret")
    page.click("button[type=submit]")
    expect(page.locator("p.error")).to_contain_text("Unknown or revoked API key")
    page.fill("#key", keys["submitter"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{api_url}/ui/")
    expect(page.locator(".who .tenant")).to_have_text("acme")
    expect(page.locator(".who .role")).to_have_text("submitter")
    expect(page.locator("figure.chart svg")).to_have_count(2)
    screenshot(page, "overview")
    for path, name in (("/ui/processors", "processors"), ("/ui/workers", "workers")):
        page.goto(f"{api_url}{path}")
        expect(page.locator(".who .tenant")).to_have_text("acme")
        screenshot(page, name)
    expect(page.locator("main")).to_contain_text(settings.worker_id)
    context.close()


def test_a_run_goes_from_queued_to_succeeded_on_the_list_without_a_reload(
        page_as: Callable[..., Page], client: RunnerClient, worker: WorkerProcess) -> None:
    page = page_as("viewer", "/ui/runs")
    no_reload_marker(page)
    run = client.submit("echo", {"n": nonce()}, labels={"suite": "dashboard"})
    row = page.locator(f'tr[data-run-id="{run["id"]}"]')
    expect(row).to_have_count(1)  # added by the live poll
    expect(row.locator('[data-cell="status"]')).to_have_text(
        re.compile(r"succeeded"), timeout=UI_TIMEOUT_MS)
    expect(row).to_contain_text("suite=dashboard")
    assert stayed(page), "the page reloaded"
    screenshot(page, "runs")


def test_a_running_log_is_followed_live_and_the_run_is_canceled_from_its_page(
        page_as: Callable[..., Page], client: RunnerClient, worker: WorkerProcess) -> None:
    # The one worker is kept busy a moment, so the run's page opens while it waits:
    # its log then arrives through the live poll, not with the page.
    blocker = client.submit("sleep", {"seconds": 3, "n": nonce()})
    run = client.submit("sleep", {"seconds": 60, "n": nonce()}, labels={"case": "follow"})
    page = page_as("submitter", f"/ui/runs/{run['id']}")
    assert page.locator("#log").inner_text() == ""
    assert client.run(run["id"])["status"] == "queued", "started before the page opened"
    no_reload_marker(page)
    expect(page.locator("#log")).to_contain_text("sleeping 60", timeout=UI_TIMEOUT_MS)
    expect(page.locator("#run-status")).to_have_text("running")
    assert stayed(page), "the page reloaded"
    screenshot(page, "run-following")
    page.click("#cancel-form button")
    expect(page.locator("#run-status")).to_have_text("canceled", timeout=UI_TIMEOUT_MS)
    assert client.wait(run["id"], timeout=60)["status"] == "canceled"
    # The ended run's page (reloaded by the script once the run ended) offers a replay
    # and shows the attempt on its timeline, with its provenance receipt.
    expect(page.locator("#replay-form button")).to_be_visible()
    expect(page.locator("svg.timeline rect")).to_have_count(1)
    expect(page.locator("main")).to_contain_text("image id")
    screenshot(page, "run")
    client.wait(blocker["id"], timeout=60)


def test_a_viewer_sees_no_buttons_and_its_posts_change_nothing(
        page_as: Callable[..., Page], ui_as: Callable[[str], UiClient],
        client: RunnerClient, run_and_wait: Callable[..., dict[str, Any]],
        store: Store) -> None:
    ended = run_and_wait("echo", {"n": nonce()})
    waiting = client.submit("sleep", {"seconds": 60, "n": nonce()})
    try:
        page = page_as("viewer", f"/ui/runs/{waiting['id']}")
        expect(page.locator("#run-status")).to_be_visible()
        assert page.locator("#cancel-form, #replay-form").count() == 0
        page.goto(f"{page.url.split('/ui/')[0]}/ui/runs/{ended['id']}")
        expect(page.locator("#run-status")).to_have_text("succeeded")
        assert page.locator("#cancel-form, #replay-form").count() == 0
        page.goto(f"{page.url.split('/ui/')[0]}/ui/dead-letters")
        assert page.locator('input[name="run"], button:has-text("Replay")').count() == 0

        viewer = ui_as("viewer")
        cancel = f"/ui/runs/{waiting['id']}/cancel"
        assert viewer.post(cancel).status_code == 403  # no token
        assert viewer.post(cancel, {"csrf": "x" * 43}).status_code == 403  # a wrong one
        assert viewer.post(cancel, {"csrf": viewer.csrf}).status_code == 403  # its role
        assert viewer.post(f"/ui/runs/{ended['id']}/replay",
                           {"csrf": viewer.csrf}).status_code == 403
        submitter = ui_as("submitter")
        assert submitter.post(cancel, {"csrf": viewer.csrf}).status_code == 403
        assert submitter.post(cancel, {"csrf": submitter.csrf},
                              headers={"Origin": "https://evil.example"}).status_code == 403
        after = client.run(waiting["id"])
        assert after["status"] in ("queued", "running") and not after["cancel_requested"]
        assert store.replays_of([ended["id"]]) == []
    finally:
        client.cancel(waiting["id"])


def test_a_script_in_a_label_and_in_a_log_line_is_shown_as_text(
        page_as: Callable[..., Page], run_and_wait: Callable[..., dict[str, Any]]) -> None:
    run = run_and_wait("echo", {"x": SCRIPT, "n": nonce()}, labels={"note": SCRIPT})
    page = page_as("viewer", "/ui/runs")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.reload()
    expect(page.locator(f'tr[data-run-id="{run["id"]}"]')).to_contain_text(f"note={SCRIPT}")
    page.goto(f"{page.url.split('/ui/')[0]}/ui/runs/{run['id']}")
    expect(page.locator("#log")).to_contain_text(f"x={SCRIPT}")
    assert f"note={SCRIPT}" in page.inner_text("body")
    assert SCRIPT in page.locator("pre.json").first.inner_text()
    assert page.locator("script:not([src])").count() == 0
    assert dialogs == []


def test_another_tenants_run_is_not_found(
        ui_as: Callable[[str], UiClient], run_and_wait: Callable[..., dict[str, Any]]) -> None:
    run = run_and_wait("echo", {"n": nonce()})
    other = ui_as("other")
    for path in (f"/ui/runs/{run['id']}", f"/ui/runs/{run['id']}/live",
                 f"/ui/runs/{run['id']}/log"):
        assert other.get(path).status_code == 404, path
    answer = other.post(f"/ui/runs/{run['id']}/replay", {"csrf": other.csrf})
    assert answer.status_code == 404
    listed = other.get("/ui/runs/live", params={"ids": run["id"], "newest": "-"}).json()
    assert listed["runs"] == []
    assert run["id"] not in other.get("/ui/runs").text


def test_the_list_filters_by_label_and_status_and_pages_by_cursor(
        ui_as: Callable[[str], UiClient], client: RunnerClient,
        worker: WorkerProcess) -> None:
    batch = nonce()
    made = [client.submit("echo", {"n": nonce()}, labels={"batch": batch})["id"]
            for _ in range(3)]
    for run_id in made:
        client.wait(run_id, timeout=120)
    ui = ui_as("viewer")

    def listed(**params: str) -> list[str]:
        html = ui.get("/ui/runs", params=params).text
        return re.findall(r'<tr data-run-id="([0-9a-f-]{36})"', html)

    assert listed(label=f"batch={batch}") == made[::-1]  # newest first
    assert listed(label=f"batch={batch}", status="failed") == []
    assert listed(label=f"batch={batch}", status="succeeded", processor="echo") == made[::-1]
    assert listed(label=f"batch={batch}", cursor=encode_cursor(made[1])) == [made[0]]
    assert listed(label=f"batch={batch}", created_before="2000-01-01T00:00") == []


def test_dead_letters_are_replayed_from_their_page(
        page_as: Callable[..., Page], settings: Settings, store: Store,
        client: RunnerClient, worker: WorkerProcess) -> None:
    manifests = ManifestSource(settings.manifest)
    dead = [submit_parked(store, settings, manifests, "echo") for _ in range(2)]
    for run in dead:
        assert Lifecycle(store).end_queued(run.id, RunStatus.DEAD_LETTER,
                                           error_code=ErrorCode.DOCKER_UNAVAILABLE,
                                           message="the engine went away", stage="launch")
    page = page_as("submitter", "/ui/dead-letters")
    one, many = (page.locator(f'tr[data-run-id="{run.id}"]') for run in dead)
    expect(one).to_contain_text("docker_unavailable")
    expect(page.locator("#select-all")).to_be_visible()  # shown by the script
    screenshot(page, "dead-letters")
    many.locator('input[name="run"]').check()
    page.click("#replay-ticked")  # many at once: here, the one ticked
    expect(page.locator("h1")).to_have_text("Replay")
    replayed = page.locator("table a").nth(1).inner_text()
    page.goto(page.url.replace("/ui/dead-letters/replay", "/ui/dead-letters"))
    one.locator("button", has_text="Replay").click()  # one, from its row
    page.wait_for_url(re.compile(r"/ui/runs/[0-9a-f-]{36}$"))
    single = page.url.rsplit("/", 1)[1]
    for original, replay_id in ((dead[0].id, single), (dead[1].id, replayed)):
        assert client.wait(replay_id, timeout=120)["status"] == "succeeded"
        assert [r[1] for r in store.replays_of([original])] == [replay_id]


def test_signing_out_and_revoking_the_key_end_the_session(
        page_as: Callable[..., Page], api_url: str, store: Store) -> None:
    page = page_as("viewer", "/ui/runs")
    cookie = next(c for c in page.context.cookies() if c["name"] == "runner_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    page.click("text=Sign out")
    page.wait_for_url(f"{api_url}/ui/login")
    page.goto(f"{api_url}/ui/")
    assert page.url.startswith(f"{api_url}/ui/login")
    stale = httpx.get(f"{api_url}/ui/runs", cookies={"runner_ui": cookie["value"]})
    assert stale.status_code == 303 and stale.headers["location"].startswith("/ui/login")

    _key, plain = Keys(store).create(tenant="acme", role=Role.VIEWER)
    revoked = UiClient(api_url, plain)
    assert revoked.get("/ui/runs").status_code == 200
    Keys(store).revoke(plain)
    wait_until(lambda: revoked.get("/ui/runs").status_code == 303, timeout=15,
               message="a revoked key's session still works")
    revoked.close()


def test_every_dashboard_response_carries_the_security_headers(
        ui_as: Callable[[str], UiClient], api_url: str,
        run_and_wait: Callable[..., dict[str, Any]]) -> None:
    run = run_and_wait("echo", {"n": nonce()})
    login = httpx.get(f"{api_url}/ui/login")
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert "secure" not in cookie
    over_https = httpx.get(f"{api_url}/ui/login", headers={"X-Forwarded-Proto": "https"})
    assert "secure" in over_https.headers["set-cookie"].lower()  # from a trusted proxy
    ui = ui_as("admin")
    pages = ["/ui/", "/ui/runs", f"/ui/runs/{run['id']}", "/ui/processors", "/ui/workers",
             "/ui/dead-letters", "/ui/runs/00000000-0000-0000-0000-000000000000"]
    for path in pages:
        answer = ui.get(path)
        assert answer.status_code in (200, 404), path
        headers = answer.headers
        assert headers["content-security-policy"] == CSP, path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "same-origin", path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["cache-control"] == "no-store", path
        html = answer.text
        assert not re.search(r"<script(?![^>]*\ssrc=)", html), path
        assert not re.search(r"\sstyle=|\son[a-z]+=", html), path
    for path in ("/ui/static/ui.css", "/ui/static/ui.js", login.url.path):
        headers = httpx.get(f"{api_url}{path}").headers
        assert headers["content-security-policy"] == CSP and \
            headers["x-frame-options"] == "DENY", path
    wrong = ui.get(f"/ui/runs/{run['id']}/live", params={"offset": -1})
    assert wrong.status_code == 422 and wrong.headers["x-frame-options"] == "DENY"
    assert ui.get("/ui/runs", params={"status": "nope"}).status_code == 422
    # The dashboard is a browser's interface, not part of the API's document.
    schema = httpx.get(f"{api_url}/openapi.json").json()
    assert not [path for path in schema["paths"] if path.startswith("/ui")]
