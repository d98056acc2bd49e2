"""Scale: list latency at 100,000 runs, worker memory over 1,000 runs, a 1 GB log flood,
and zero containers left. About ten minutes on a quiet 2-core machine.

- list latency: bench/list_latency.py (its own database filled with 100,000 runs);
- worker RSS: one `runner worker` runs 1,000 echo runs submitted through the API;
  VmRSS from /proc is sampled every 100 finished runs; "flat" means it grows less
  than 8 MiB from the 100th run to the last (the first hundred warm caches up);
- log flood: the logflood sample writes 1 GiB of output against its 1 MiB log cap;
  the stored log must stay at the cap and the worker's RSS (sampled every 0.2 s)
  must stay near its baseline;
- containers: none of this stack's may be left once the worker has stopped.

    python bench/scale.py [--rss-runs 1000] [--flood-mb 1024] [--list-runs 100000]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import list_latency
from bench import stack as bench_stack
from runner.control.models import RunRow
from tests.support.processes import RunnerProcess

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ["succeeded", "failed", "timed_out", "canceled", "dead_letter"]
API_LIMITS = {"key_requests_per_second": 1_000_000,
              "tenant_submissions_per_minute": 100_000_000,
              "tenant_max_active_runs": 10_000_000}
FLAT_KIB = 8 * 1024


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of RSS (KiB) against finished runs, in KiB per 100 runs."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def finished(stack: bench_stack.Stack, processor: str) -> tuple[int, int]:
    """(terminal runs, succeeded runs) of `processor` in the stack's database."""
    with stack.store.session() as session:
        rows = session.execute(select(RunRow.status, func.count()).where(
            RunRow.processor == processor).group_by(RunRow.status)).all()
    counts = {status: count for status, count in rows}
    return sum(counts.get(s, 0) for s in TERMINAL), counts.get("succeeded", 0)


def worker_rss(stack: bench_stack.Stack, worker: RunnerProcess, http: httpx.Client,
               runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    warm = 5
    for _ in range(warm):
        http.post("/v1/runs", json={"processor": "echo", "input": {"message": "warm"}})
    while finished(stack, "echo")[0] < warm:
        time.sleep(0.2)
    points = [(0, worker.rss_kib())]
    started = time.monotonic()
    for i in range(runs):
        response = http.post("/v1/runs", json={"processor": "echo",
                                               "input": {"message": f"rss {i}"}})
        response.raise_for_status()
    log(f"  {runs} echo runs queued in {time.monotonic() - started:.1f}s")
    next_mark = 100
    done = succeeded = 0
    deadline = time.monotonic() + 60 * 60
    while done < runs + warm:
        time.sleep(0.25)
        done, succeeded = finished(stack, "echo")
        while done - warm >= next_mark:
            points.append((done - warm, worker.rss_kib()))
            log(f"  {done - warm} runs: worker VmRSS {points[-1][1] / 1024:.1f} MiB")
            next_mark += 100
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {runs} runs finished in an hour")
    elapsed = time.monotonic() - started
    after_warmup = [p for p in points if p[0] >= 100]
    growth = after_warmup[-1][1] - after_warmup[0][1] if after_warmup else 0
    return {"runs": runs, "succeeded": succeeded - warm, "elapsed_s": round(elapsed, 1),
            "runs_per_s": round(runs / elapsed, 2),
            "rss_kib": points, "growth_kib_100_to_last": growth,
            "slope_kib_per_100_runs": round(slope(after_warmup), 1),
            "vmhwm_kib": worker.memory_kib("VmHWM"),
            "flat": growth < FLAT_KIB}


def log_flood(stack: bench_stack.Stack, worker: RunnerProcess, http: httpx.Client,
              megabytes: int, log: Callable[[str], None]) -> dict[str, Any]:
    baseline = worker.rss_kib()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                peak[0] = max(peak[0], worker.rss_kib())
            except (OSError, RuntimeError):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    run = http.post("/v1/runs", json={"processor": "logflood",
                                      "input": {"megabytes": megabytes}}).json()
    while True:
        run = http.get(f"/v1/runs/{run['id']}").json()
        if run["status"] in TERMINAL:
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join(5)
    stored = len(http.get(f"/v1/runs/{run['id']}/logs").content)
    cap = 1024 * 1024
    log(f"  {megabytes} MiB flood: {run['status']} in {elapsed:.1f}s, {stored} bytes stored, "
        f"truncated {run['log_truncated']}, worker RSS {baseline / 1024:.1f} -> peak "
        f"{peak[0] / 1024:.1f} MiB")
    return {"megabytes": megabytes, "status": run["status"], "elapsed_s": round(elapsed, 1),
            "log_bytes": run["log_bytes"], "stored_bytes": stored,
            "log_truncated": run["log_truncated"], "log_cap_bytes": cap,
            "capped": stored <= cap + 256 and run["log_truncated"],
            "worker_rss_baseline_kib": baseline, "worker_rss_peak_kib": peak[0],
            "worker_rss_growth_kib": peak[0] - baseline,
            "bounded": peak[0] - baseline < 32 * 1024}


def render(result: dict[str, Any]) -> str:
    lines = ["scale"]
    if "list" in result:
        lines += list_latency.render(result["list"])
    rss = result.get("rss")
    if rss:
        first = next((p for p in rss["rss_kib"] if p[0] >= 100), rss["rss_kib"][0])
        lines.append(f"worker RSS over {rss['runs']} runs (1 worker, {rss['runs_per_s']} runs/s):"
                     f" {first[1] / 1024:.1f} MiB at run {first[0]} -> "
                     f"{rss['rss_kib'][-1][1] / 1024:.1f} MiB at run {rss['rss_kib'][-1][0]}, "
                     f"slope {rss['slope_kib_per_100_runs']:.0f} KiB/100 runs: "
                     f"{'flat' if rss['flat'] else 'GROWING'}")
    flood = result.get("flood")
    if flood:
        lines.append(f"log flood {flood['megabytes']} MiB: {flood['status']} in "
                     f"{flood['elapsed_s']}s, stored {flood['stored_bytes']} bytes (cap "
                     f"{flood['log_cap_bytes']}, truncated {flood['log_truncated']}): "
                     f"{'capped' if flood['capped'] else 'NOT CAPPED'}; worker RSS +"
                     f"{flood['worker_rss_growth_kib'] / 1024:.1f} MiB at peak: "
                     f"{'bounded' if flood['bounded'] else 'NOT BOUNDED'}")
    lines.append(f"containers left: {result.get('containers_left')}")
    return "\n".join(lines)


def run_scale(*, log: Callable[[str], None] = print, rss_runs: int = 1000,
              flood_mb: int = 1024, list_runs: int = 100_000, list_requests: int = 200,
              keep: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if list_runs:
        log(f"list latency at {list_runs} runs")
        result["list"] = list_latency.measure(list_runs, list_requests, log=lambda m:
                                              log(f"  {m}"))
    client = docker.from_env(timeout=120)
    published = bench_stack.publish_samples(["echo", "logflood"], client)
    flood = published["logflood"]
    flood["limits"] = {**flood.get("limits", {}), "log_bytes": "1Mi", "timeout": "600s"}
    tag = secrets.token_hex(3)
    with bench_stack.stack(list(published.values()), tag=tag, keep=keep) as stack:
        api = stack.start_api(**API_LIMITS)
        worker = stack.start_worker("scale")
        with httpx.Client(base_url=api.url, timeout=60,
                          headers={"Authorization": f"Bearer {stack.key}"}) as http:
            if rss_runs:
                log(f"worker RSS over {rss_runs} runs")
                result["rss"] = worker_rss(stack, worker, http, rss_runs, log)
            if flood_mb:
                log(f"log flood of {flood_mb} MiB")
                result["flood"] = log_flood(stack, worker, http, flood_mb, log)
        stack.stop(worker)
        stack.stop(api)
        time.sleep(1)
        left = stack.containers(client)
        result["containers_left"] = len(left)
        for container in left:
            container.remove(force=True, v=True)
    result["text"] = render(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rss-runs", type=int, default=1000)
    parser.add_argument("--flood-mb", type=int, default=1024)
    parser.add_argument("--list-runs", type=int, default=100_000)
    parser.add_argument("--list-requests", type=int, default=200)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)

    result = run_scale(log=log, rss_runs=args.rss_runs, flood_mb=args.flood_mb,
                       list_runs=args.list_runs, list_requests=args.list_requests,
                       keep=args.keep)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    print()
    print(result["text"])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"{stamp}-scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    (out.with_suffix(".md")).write_text(f"# Scale {stamp}\n\n```\n{result['text']}\n```\n")
    print(f"\nresults: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
