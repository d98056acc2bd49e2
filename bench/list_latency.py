"""List latency at 100,000 runs: GET /v1/runs through the real API on PostgreSQL.

Fills a fresh database with runs spread over tenants, statuses, processors and
labels, then times each filter combination through HTTP (keyset pagination: the
first page and a deep page from a cursor). Prints p50/p99 per query.

    python bench/list_latency.py [--runs 100000] [--requests 200]
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.control.keys import Keys
from runner.control.models import RunRow
from runner.control.store import Store
from runner.domain import Role, RunStatus
from runner.settings import load_settings
from tests.support.services import ApiServer, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
PG = "postgresql://runner:runner@127.0.0.1:5439/runner"


def fill(store: Store, count: int) -> None:
    statuses = [s.value for s in RunStatus]
    start = datetime.now(UTC) - timedelta(days=30)
    rows = []
    for i in range(count):
        created = start + timedelta(seconds=i * 25)
        ms = int(created.timestamp() * 1000)
        raw = f"{ms:012x}{secrets.token_hex(10)}"
        rows.append({
            "id": f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}",
            "tenant": f"t{i % 10}", "status": random.choice(statuses),
            "processor": random.choice(["echo", "sleep", "exit", "memhog"]),
            "version": "1.0.0", "image": "127.0.0.1:5000/processors/echo@sha256:" + "0" * 64,
            "queue": "runner", "input": {"i": i}, "labels": {"batch": str(i % 100)},
            "timeout_seconds": 30.0, "attempt": 1, "max_attempts": 1, "log_bytes": 0,
            "log_truncated": False, "created_at": created})
    with store.session() as session:
        for chunk in range(0, count, 5000):
            session.execute(RunRow.__table__.insert(), rows[chunk:chunk + 5000])
        session.execute(__import__("sqlalchemy").text("ANALYZE runs"))


QUERIES = ("first page (limit 50)", "status=failed", "processor=echo", "label batch=13 (1%)",
           "created in last 10 days", "deep page (cursor)")


def measure(runs: int, requests: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill a fresh database with `runs` runs; p50/p99 ms of each list query over HTTP."""
    name = f"runner_list_{secrets.token_hex(3)}"
    url = create_database(PG, name)
    try:
        settings = load_settings(database_url=url, manifest=ROOT / "manifests/example.yaml",
                                 key_requests_per_second=0, log_level="warning")
        store = Store(settings.database_url)
        started = time.monotonic()
        fill(store, runs)
        log(f"inserted {runs} runs in {time.monotonic() - started:.1f}s")
        _, key = Keys(store).create(tenant="t3", role=Role.VIEWER)
        server = ApiServer(settings)
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"})
        deep = http.get("/v1/runs", params={"limit": 200}).json()
        for _ in range(20):  # walk 4,200 runs in
            if not deep.get("next_cursor"):
                break
            deep = http.get("/v1/runs", params={"limit": 200,
                                                "cursor": deep["next_cursor"]}).json()
        queries: dict[str, dict[str, Any]] = dict(zip(QUERIES, [
            {"limit": 50},
            {"status": "failed", "limit": 50},
            {"processor": "echo", "limit": 50},
            {"label": "batch=13", "limit": 50},
            {"created_after": (datetime.now(UTC) - timedelta(days=10)).isoformat(),
             "limit": 50},
            {"limit": 50, **({"cursor": deep["next_cursor"]} if deep.get("next_cursor")
                             else {})},
        ], strict=True))
        results: dict[str, Any] = {}
        for label, params in queries.items():
            times = []
            for _ in range(requests):
                t = time.perf_counter()
                response = http.get("/v1/runs", params=params)
                times.append((time.perf_counter() - t) * 1000)
                assert response.status_code == 200, response.text
            times.sort()
            results[label] = {"p50_ms": round(statistics.median(times), 1),
                              "p99_ms": round(times[max(0, int(len(times) * 0.99) - 1)], 1)}
        http.close()
        server.stop()
        store.close()
        return {"runs": runs, "requests": requests, "queries": results}
    finally:
        drop_database(PG, name)


def render(measured: dict[str, Any]) -> list[str]:
    lines = [f"{'GET /v1/runs at ' + str(measured['runs']) + ' runs':<34}{'p50 ms':>9}"
             f"{'p99 ms':>9}"]
    for label, figures in measured["queries"].items():
        lines.append(f"  {label:<32}{figures['p50_ms']:>9.1f}{figures['p99_ms']:>9.1f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    measured = measure(args.runs, args.requests)
    lines = render(measured)
    print("\n".join(lines))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "list_latency.txt").write_text(
        f"# GET /v1/runs at {args.runs} runs (10 tenants), PostgreSQL, "
        f"{args.requests} requests each, {datetime.now(UTC):%Y-%m-%d}\n"
        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
