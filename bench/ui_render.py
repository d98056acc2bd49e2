"""Dashboard render time at 100,000 runs: the pages of /ui/ through the real API on
PostgreSQL, signed in as a browser would be.

Fills a fresh database the way bench/list_latency.py does (10 tenants, every status,
four processors, labels), signs in on /ui/login with a viewer key, then times each
page over loopback HTTP: the runs page (first page, filtered by status, by label, a
deep page from a cursor), one run's page, the live-update poll, and the overview. The
time is the whole request as the client sees it, so the server's own time is at most
that. Goal (issue 14): the runs page p99 under 50 ms.

    python bench/ui_render.py [--runs 100000] [--requests 200] [--save]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.list_latency import PG, ROOT, fill
from runner.control.keys import Keys
from runner.control.store import Store
from runner.domain import Role
from runner.settings import load_settings
from tests.support.services import ApiServer, create_database, drop_database

GOAL_MS = 50.0


def sign_in(base_url: str, key: str) -> httpx.Client:
    """A client holding a dashboard session (the login form's double-submit token)."""
    http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=30)
    page = http.get("/ui/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None, page.text[:400]
    answer = http.post("/ui/login", data={"csrf": token.group(1), "key": key, "next": "/ui/"})
    assert answer.status_code in (302, 303), answer.text[:400]
    return http


def timed(http: httpx.Client, path: str, params: dict[str, Any], requests: int
          ) -> dict[str, float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = http.get(path, params=params)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
    times.sort()
    return {"p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[max(0, int(len(times) * 0.99) - 1)], 1)}


def measure(runs: int, requests: int) -> dict[str, Any]:
    name = f"runner_ui_{secrets.token_hex(3)}"
    url = create_database(PG, name)
    try:
        settings = load_settings(database_url=url, manifest=ROOT / "manifests/example.yaml",
                                 key_requests_per_second=0, log_level="warning")
        store = Store(settings.database_url)
        started = time.monotonic()
        fill(store, runs)
        print(f"inserted {runs} runs in {time.monotonic() - started:.1f}s", flush=True)
        _, key = Keys(store).create(tenant="t3", role=Role.VIEWER)
        server = ApiServer(settings)
        http = sign_in(server.url, key)
        try:
            first = http.get("/ui/runs").text
            run_id = re.search(r'/ui/runs/([0-9a-f-]{36})', first)
            assert run_id is not None
            cursor = None
            params: dict[str, Any] = {}
            for _ in range(20):  # walk a few thousand runs in, as a person paging would
                page = http.get("/ui/runs", params=params).text
                found = re.search(r'[?&]cursor=([A-Za-z0-9_-]+)', page)
                if found is None:
                    break
                cursor = found.group(1)
                params = {"cursor": cursor}
            pages: dict[str, tuple[str, dict[str, Any]]] = {
                "runs: first page": ("/ui/runs", {}),
                "runs: status=failed": ("/ui/runs", {"status": "failed"}),
                "runs: label batch=13": ("/ui/runs", {"label": "batch=13"}),
                "runs: deep page (cursor)": ("/ui/runs", {"cursor": cursor} if cursor else {}),
                "one run": (f"/ui/runs/{run_id.group(1)}", {}),
                "overview (last hour)": ("/ui/", {}),
            }
            results = {label: timed(http, path, query, requests)
                       for label, (path, query) in pages.items()}
        finally:
            http.close()
            server.stop()
            store.close()
        return {"runs": runs, "requests": requests, "pages": results, "goal_ms": GOAL_MS}
    finally:
        drop_database(PG, name)


def render(measured: dict[str, Any]) -> list[str]:
    lines = [f"{'/ui/ at ' + str(measured['runs']) + ' runs':<30}{'p50 ms':>9}{'p99 ms':>9}"
             "  goal"]
    for label, figures in measured["pages"].items():
        held = "" if not label.startswith("runs") else (
            "  held" if figures["p99_ms"] < GOAL_MS else "  NOT HELD")
        lines.append(f"  {label:<28}{figures['p50_ms']:>9.1f}{figures['p99_ms']:>9.1f}{held}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    measured = measure(args.runs, args.requests)
    lines = render(measured)
    print("\n".join(lines))
    if args.save:
        stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        out = ROOT / "bench" / "results"
        (out / f"{stamp}-ui.json").write_text(json.dumps(measured, indent=2) + "\n")
        (out / f"{stamp}-ui.md").write_text(
            f"# Dashboard render time at {args.runs} runs (PostgreSQL, {args.requests} "
            f"requests each, loopback), {datetime.now(UTC):%Y-%m-%d %H:%M}Z\n\n```\n"
            + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
