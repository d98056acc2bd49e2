"""Batches and fairness, on one scratch stack on PostgreSQL:

- **batch rate**: runs accepted per second by one `runner api` process through
  POST /v1/runs/batch (batches of `--batch` items, two connections), against the
  single POST's closed-loop rate measured on the same process in the same run;
- **fairness**: tenant B's queue wait (the run's `started_at` - `created_at`), one run
  at a time, on an idle queue and then behind tenant A's backlog of `--backlog`
  runs, with the workers' run time, checked against "B waits at most 2x its idle
  wait plus one run time".

    python bench/batches.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apiload import (
    LOAD_ENTRY,
    LOAD_LIMITS,
    RawHttp,
    closed_loop,
    measured,
    post_request,
)
from bench.stack import Stack, publish_samples, quantile, stack
from runner.control.keys import Keys
from runner.domain import Role

ECHO_INPUT = {"message": "bench"}


def batch_request(url: str, key: str, processor: str, size: int) -> tuple[str, int, bytes]:
    parsed = httpx.URL(url)
    body = json.dumps({"runs": [{"processor": processor, "input": ECHO_INPUT}] * size}).encode()
    head = (f"POST /v1/runs/batch HTTP/1.1\r\nHost: {parsed.host}:{parsed.port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return str(parsed.host), int(parsed.port or 80), head + body


def rates(made: Stack, *, size: int, seconds: float) -> dict[str, Any]:
    """Batch and single-POST closed loops on one API process, interleaved twice."""
    api = made.start_api("api-rate", **LOAD_LIMITS)
    assert api.url is not None
    host, port, single = post_request(api.url, made.key, LOAD_ENTRY["name"])
    _, _, many = batch_request(api.url, made.key, LOAD_ENTRY["name"], size)
    asyncio.run(closed_loop(lambda: RawHttp(host, port, single), 4, 2))  # warm
    asyncio.run(closed_loop(lambda: RawHttp(host, port, many), 2, 2))
    singles, batches = [], []
    for _ in range(2):
        singles.append(measured(api.pid, lambda: asyncio.run(closed_loop(
            lambda: RawHttp(host, port, single), 8, seconds))))
        step = measured(api.pid, lambda: asyncio.run(closed_loop(
            lambda: RawHttp(host, port, many), 2, seconds)))
        step["runs_per_s"] = round(step["throughput_per_s"] * size, 1)
        step["api_cpu_ms_per_run"] = round(step["api_cpu_ms_per_run"] / size, 3)
        batches.append(step)
    made.stop(api)
    single_rate = statistics.median(s["throughput_per_s"] for s in singles)
    batch_rate = statistics.median(b["runs_per_s"] for b in batches)
    return {"batch_size": size, "single": singles, "batch": batches,
            "single_per_s": single_rate, "batch_runs_per_s": batch_rate,
            "ratio": round(batch_rate / single_rate, 1) if single_rate else None}


def _wait(client: httpx.Client, run_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run: dict[str, Any] = client.get(f"/v1/runs/{run_id}", params={"wait": 30}).json()
        if run["status"] in ("succeeded", "failed", "timed_out", "canceled", "dead_letter"):
            return run
    raise TimeoutError(f"run {run_id} did not end in {timeout:g}s")


def _seconds(run: dict[str, Any], start: str, end: str) -> float:
    return (datetime.fromisoformat(run[end]) - datetime.fromisoformat(run[start])).total_seconds()


def b_waits(client: httpx.Client, count: int, processor: str
            ) -> tuple[list[float], list[float]]:
    """Tenant B submits `count` runs one after the other, each once the last ended:
    their queue waits and run times, in seconds."""
    waits, runs = [], []
    for i in range(count):
        posted = client.post("/v1/runs", json={"processor": processor, "input": {
            "message": f"b-{i}"}})
        posted.raise_for_status()
        run = _wait(client, posted.json()["id"])
        waits.append(_seconds(run, "created_at", "started_at"))
        runs.append(_seconds(run, "started_at", "finished_at"))
    return waits, runs


def fairness(made: Stack, *, backlog: int, samples: int, workers: int,
             processor: str = "echo", queue: str | None = None) -> dict[str, Any]:
    """B's queue wait idle and behind A's backlog of `processor` runs, with `workers`
    worker processes on `queue` (the stack's by default)."""
    api = made.start_api("api-fair", **LOAD_LIMITS)
    assert api.url is not None
    pool = [made.start_worker(f"fair-w{i}", queue=queue) for i in range(workers)]
    for worker in pool:
        worker.wait_ready(marker="worker_started", timeout=120)
    b_key = Keys(made.store).create(tenant="tenant-b", role=Role.SUBMITTER)[1]
    a_key = made.key
    with httpx.Client(base_url=api.url, timeout=60,
                      headers={"Authorization": f"Bearer {b_key}"}) as b, \
            httpx.Client(base_url=api.url, timeout=120,
                         headers={"Authorization": f"Bearer {a_key}"}) as a:
        b_waits(b, 3, processor)  # warm: images, connections
        idle_waits, idle_runs = b_waits(b, samples, processor)
        started = time.monotonic()
        for offset in range(0, backlog, 500):
            answer = a.post("/v1/runs/batch", json={"runs": [
                {"processor": processor, "input": {"message": f"a-{offset + i}"}}
                for i in range(min(500, backlog - offset))]})
            answer.raise_for_status()
        queued_in = time.monotonic() - started
        busy_waits, busy_runs = b_waits(b, samples, processor)
        left = a.get("/v1/runs", params={"status": "queued", "limit": 1}).json()
    for worker in pool:
        made.stop(worker)
    made.stop(api)
    run_time = statistics.median(idle_runs + busy_runs)
    idle_p99, busy_p99 = quantile(idle_waits, 0.99), quantile(busy_waits, 0.99)
    bound = 2 * idle_p99 + run_time
    return {"backlog": backlog, "workers": workers, "samples": samples,
            "backlog_queued_s": round(queued_in, 2),
            "a_still_queued_at_end": bool(left["items"]),
            "idle_wait_p50_ms": round(quantile(idle_waits, 0.5) * 1000, 1),
            "idle_wait_p99_ms": round(idle_p99 * 1000, 1),
            "backlog_wait_p50_ms": round(quantile(busy_waits, 0.5) * 1000, 1),
            "backlog_wait_p99_ms": round(busy_p99 * 1000, 1),
            "run_time_ms": round(run_time * 1000, 1), "bound_ms": round(bound * 1000, 1),
            "within_bound": busy_p99 <= bound}


def run_all(made: Stack, *, quick: bool, size: int = 500, backlog: int = 5000,
            processor: str = "echo", queue: str | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both measurements on `made`, as `make bench` runs them."""
    seconds, samples = (4.0, 10) if quick else (8.0, 30)
    found: dict[str, Any] = {"rates": rates(made, size=size, seconds=seconds)}
    for line in render(found):
        log(line)
    found["fairness"] = fairness(made, backlog=backlog, samples=samples, workers=2,
                                 processor=processor, queue=queue)
    for line in render(found)[1:]:
        log(line)
    return found


def render(found: dict[str, Any]) -> list[str]:
    lines = []
    r = found.get("rates")
    if r:
        lines.append(
            f"batch: {r['batch_runs_per_s']} runs/s in batches of {r['batch_size']} on one "
            f"API process (PostgreSQL); single POST {r['single_per_s']}/s closed loop in the "
            f"same run: {r['ratio']}x; API CPU per run {r['batch'][0]['api_cpu_ms_per_run']} "
            f"ms in batches, {r['single'][0]['api_cpu_ms_per_run']} ms single")
    f = found.get("fairness")
    if f:
        lines.append(
            f"fairness ({f['workers']} workers): tenant B's queue wait p99 "
            f"{f['idle_wait_p99_ms']} ms on an idle queue, {f['backlog_wait_p99_ms']} ms "
            f"behind tenant A's {f['backlog']} queued runs (p50 {f['idle_wait_p50_ms']} / "
            f"{f['backlog_wait_p50_ms']} ms); one run takes {f['run_time_ms']} ms; bound "
            f"2 x idle p99 + one run = {f['bound_ms']} ms: "
            f"{'met' if f['within_bound'] else 'NOT met'} (A still queued at the end: "
            f"{f['a_still_queued_at_end']})")
    return lines


def goal_values(found: dict[str, Any]) -> list[tuple[str, float | None, float, bool]]:
    """(goal, value, limit, higher is better) for `bench/suite.py`'s goals."""
    r, f = found.get("rates") or {}, found.get("fairness") or {}
    return [
        ("batch >= 3000 runs/s on one API process", r.get("batch_runs_per_s"), 3000, True),
        ("batch >= 20x the single POST's rate", r.get("ratio"), 20, True),
        ("fairness: B's wait p99 behind 5,000 <= 2x idle + one run (ms over)",
         (f["backlog_wait_p99_ms"] - f["bound_ms"]) if f else None, 0, False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter steps, fewer samples")
    parser.add_argument("--batch", type=int, default=500, help="items per batch")
    parser.add_argument("--backlog", type=int, default=5000, help="tenant A's backlog")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    client = docker.from_env()
    entries = list(publish_samples(["echo"], client).values())
    with stack([*entries, LOAD_ENTRY]) as made:
        found = run_all(made, quick=args.quick, size=args.batch, backlog=args.backlog,
                        log=lambda line: print(line, flush=True))
    if args.json:
        args.json.write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
