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
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import uvicorn

from api.app import create_app
from runner.domain import Role, RunStatus
from runner.keys import Keys
from runner.migrate import upgrade
from runner.models import RunRow
from runner.settings import load_settings
from runner.store import Store

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    name = f"runner_list_{secrets.token_hex(3)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql+psycopg://runner:runner@127.0.0.1:5439/{name}"
        upgrade(url)
        settings = load_settings(database_url=url, manifest=ROOT / "manifests/example.yaml",
                                 key_requests_per_second=0, log_level="warning")
        store = Store(url)
        started = time.monotonic()
        fill(store, args.runs)
        print(f"inserted {args.runs} runs in {time.monotonic() - started:.1f}s")
        _, key = Keys(store).create(tenant="t3", role=Role.VIEWER)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1",
                                               port=8765, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        http = httpx.Client(base_url="http://127.0.0.1:8765",
                            headers={"Authorization": f"Bearer {key}"})
        deep = http.get("/v1/runs", params={"limit": 200}).json()
        for _ in range(20):  # walk 4,200 runs in
            deep = http.get("/v1/runs", params={"limit": 200,
                                                "cursor": deep["next_cursor"]}).json()
        queries = {
            "first page (limit 50)": {"limit": 50},
            "status=failed": {"status": "failed", "limit": 50},
            "processor=echo": {"processor": "echo", "limit": 50},
            "label batch=13 (1%)": {"label": "batch=13", "limit": 50},
            "created in last 10 days": {"created_after": (datetime.now(UTC)
                                                          - timedelta(days=10)).isoformat(),
                                        "limit": 50},
            "deep page (cursor)": {"limit": 50, "cursor": deep["next_cursor"]},
        }
        lines = [f"{'query':<24}{'p50 ms':>10}{'p99 ms':>10}"]
        print(lines[0])
        for label, params in queries.items():
            times = []
            for _ in range(args.requests):
                t = time.perf_counter()
                response = http.get("/v1/runs", params=params)
                times.append((time.perf_counter() - t) * 1000)
                assert response.status_code == 200, response.text
            times.sort()
            line = (f"{label:<24}{statistics.median(times):>10.1f}"
                    f"{times[int(len(times) * 0.99) - 1]:>10.1f}")
            print(line)
            lines.append(line)
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / "list_latency.txt").write_text(
            f"# GET /v1/runs at {args.runs} runs (10 tenants), PostgreSQL, "
            f"{args.requests} requests each, {datetime.now(UTC):%Y-%m-%d}\n"
            + "\n".join(lines) + "\n")
        server.should_exit = True
        store.close()
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
