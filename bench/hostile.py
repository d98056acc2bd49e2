"""Hostile processors and clients against a real stack: does each bound hold, and at what figure.

Not a test (the regression tests are in tests/); this is the operator's evidence. It
starts its own stack (bench/stack.py: a database, Redis, one API and one worker), runs
each hostile case of the hardening work against it, and prints one line per case:
held or NOT HELD, and the figure measured. Run it with `make bench-hostile` (about
three minutes on a quiet 2-core machine); `--json FILE` also writes the rows.

  1  /run flood           bytes a processor could leave under /run/out, per pattern
  2  /tmp                 the processor's user can write its scratch space
  4  limit floors         `memory: 0` and friends are refused, naming the line
  5  strict JSON          a NaN result fails invalid_output; a NaN input is 422
  6  input_schema         remote $ref refused; a backtracking pattern; an alias bomb
  9  capacity             database commits/s with 1,000 runs parked at a full cap
  10 follow flood         another tenant's request latency during a follow flood
  11 list load            API RSS while listing 200 runs of 1 MiB inputs, repeatedly
  12 retention            runs deleted per second by prune, in batches
  13 small ones           NUL in a path id; a flood of bad keys from one address
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import ROOT, Stack, publish_samples, stack
from runner.authoring.publish import publish
from runner.control.keys import Keys
from runner.control.lifecycle import ClaimStatus, Lifecycle
from runner.domain import ErrorCode, NewRun, Role, RunStatus, utcnow
from runner.errors import ManifestError, RunnerError
from runner.manifest import parse_manifest

Row = dict[str, Any]
IMAGE = "127.0.0.1:5000/processors/echo@sha256:" + "a" * 64


def row(item: str, case: str, held: bool, figure: str) -> Row:
    line = f"{item:>3}  {case:<34} {'held' if held else 'NOT HELD':<9} {figure}"
    print(line, flush=True)
    return {"item": item, "case": case, "held": held, "figure": figure}


def wait_run(client: httpx.Client, run_id: str, timeout: float = 180) -> dict[str, Any]:
    found: dict[str, Any] = client.get(f"/v1/runs/{run_id}", params={"wait": 30}).json()
    deadline = time.monotonic() + timeout
    while found.get("status") in ("queued", "running") and time.monotonic() < deadline:
        found = client.get(f"/v1/runs/{run_id}", params={"wait": 30}).json()
    return found


def submit(client: httpx.Client, processor: str, payload: Any) -> httpx.Response:
    return client.post("/v1/runs", json={"processor": processor, "input": payload})


# The processor side ---------------------------------------------------------------------

def run_flood(client: httpx.Client, cap: int) -> list[Row]:
    rows = []
    for mode in ("big", "small", "sparse", "deep", "links"):
        run = wait_run(client, submit(client, "fillup", {"mode": mode}).json()["id"])
        report = filled_report(client, run["id"])
        written = int(report.get("bytes", -1))
        stopped = report.get("errno") or "nothing (it gave up first)"
        held = 0 <= written <= cap + 1024 * 1024 and report.get("errno") is not None
        rows.append(row("1", f"/run/out flood ({mode})", held,
                        f"{written:,} bytes written under a {cap:,}-byte cap; "
                        f"stopped by {stopped}; run {run.get('status')}"))
    return rows


def filled_report(client: httpx.Client, run_id: str) -> dict[str, Any]:
    """The `FILLED {json}` line the fillup processor prints once a write fails (what
    it wrote, and the errno that stopped it), read from the run's captured output."""
    for line in client.get(f"/v1/runs/{run_id}/logs").text.splitlines():
        if line.startswith("FILLED "):
            found: dict[str, Any] = json.loads(line.removeprefix("FILLED "))
            return found
    return {}


def tmp_writable(client: httpx.Client) -> Row:
    run = wait_run(client, submit(client, "fillup", {"mode": "tmp", "result": True})
                   .json()["id"])
    report = run.get("result") or {}
    written = int(report.get("bytes", 0) or 0)
    return row("2", "/tmp writable and bounded",  # noqa: S108
               written > 0 and bool(report.get("errno")),
               f"{written:,} bytes written to /tmp before {report.get('errno')}")


def strict_results(client: httpx.Client) -> list[Row]:
    rows = []
    for mode in ("nan", "infinity", "bigint"):
        run = wait_run(client, submit(client, "nanresult", {"mode": mode}).json()["id"])
        rows.append(row("5", f"result.json with {mode}", run.get("error_code") ==
                        "invalid_output", f"run {run.get('status')} / {run.get('error_code')}"))
    answer = client.post("/v1/runs", content=b'{"processor": "echo", "input": {"x": NaN}}',
                         headers={"Content-Type": "application/json"})
    rows.append(row("5", "input with NaN", answer.status_code == 422,
                    f"HTTP {answer.status_code}"))
    return rows


# The manifest ---------------------------------------------------------------------------

def manifest_problem(text: str) -> tuple[bool, str, float]:
    started = time.perf_counter()
    try:
        parse_manifest(text, source="hostile.yaml")
    except ManifestError as exc:
        return True, (exc.problems or [exc.message])[0][:90], time.perf_counter() - started
    return False, "accepted", time.perf_counter() - started


def entry(extra: str) -> str:
    return (f"version: 1\nprocessors:\n  - name: echo\n    version: '1'\n"
            f"    image: {IMAGE}\n{extra}")


def manifest_cases() -> list[Row]:
    rows = []
    for case, extra in (("memory: 0", "    limits: {memory: 0}\n"),
                        ("memory: \"0.1\"", "    limits: {memory: \"0.1\"}\n"),
                        ("cpus: 1e-10", "    limits: {cpus: 1e-10}\n"),
                        ("timeout: 0s", "    limits: {timeout: 0s}\n"),
                        ("remote $ref in input_schema",
                         "    input_schema: {$ref: 'http://127.0.0.1:9/schema.json'}\n"),
                        ("duplicate image: key", f"    image: {IMAGE}\n")):
        refused, problem, _ = manifest_problem(entry(extra))
        rows.append(row("4" if "ref" not in case and "dup" not in case else "6", case,
                        refused, problem))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}]\n" for i in range(8))
    refused, problem, seconds = manifest_problem(bomb + entry(""))
    rows.append(row("6", "YAML alias bomb (9^9 nodes)", refused and seconds < 1,
                    f"{seconds * 1000:.1f} ms: {problem}"))
    return rows


def redos(client: httpx.Client) -> Row:
    started = time.perf_counter()
    answer = submit(client, "pattern", {"text": "a" * 30 + "!"})
    seconds = time.perf_counter() - started
    return row("6", "pattern (a+)+$ on 30 a's and !", seconds < 2,
               f"HTTP {answer.status_code} in {seconds * 1000:.0f} ms")


# The state machine ----------------------------------------------------------------------

def commits_per_second(database_url: str, seconds: float = 5.0) -> float:
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    query = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute(query).fetchone()[0]  # type: ignore[index]
        time.sleep(seconds)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        after = conn.execute(query).fetchone()[0]  # type: ignore[index]
    return float(after - before) / seconds


def capacity(bench: Stack) -> Row:
    store, lifecycle = bench.store, Lifecycle(bench.store)
    idle = commits_per_second(bench.database_url)

    def new(tenant: str) -> str:
        run, _ = store.create_run(NewRun(tenant=tenant, processor="capped", version="1.0.0",
                                         image=IMAGE, queue=bench.queue, input={},
                                         timeout_seconds=30, max_attempts=1,
                                         manifest_revision="bench"))
        return run.id

    for _ in range(5):  # five holders keep the five slots
        assert lifecycle.claim(new("holder"), attempt=1, worker_id="holder",
                               lease_seconds=900, max_concurrency=5).status is \
            ClaimStatus.CLAIMED
    for _ in range(1000):
        lifecycle.claim(new("flood"), attempt=1, worker_id="bench", lease_seconds=60,
                        max_concurrency=5)
    parked = store.count_parked("capped")
    busy = commits_per_second(bench.database_url)
    return row("9", "1,000 runs at a full cap of 5", parked == 1000 and busy <= 3 * idle + 20,
               f"{parked} parked; {idle:.1f} commits/s idle, {busy:.1f} at capacity")


# The API --------------------------------------------------------------------------------

def latency_ms(client: httpx.Client, path: str, n: int = 20) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def follow_flood(bench: Stack, url: str, run_id: str) -> Row:
    # Another tenant's requests, timed before and during a flood of follows by the
    # run's own tenant from four keys.
    other = Keys(bench.store).create(tenant="victim", role=Role.SUBMITTER)[1]
    victim = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {other}"},
                          timeout=30)
    before = latency_ms(victim, "/v1/runs?limit=5")
    keys = [Keys(bench.store).create(tenant="bench", role=Role.SUBMITTER)[1]
            for _ in range(4)]
    statuses: list[int] = []
    stop = threading.Event()

    def follow(key: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            try:
                with client.stream("GET", f"/v1/runs/{run_id}/logs",
                                   params={"follow": "true"}) as answer:
                    statuses.append(answer.status_code)
                    for _ in answer.iter_bytes():
                        if stop.is_set():
                            return
            except httpx.HTTPError:
                statuses.append(0)

    threads = [threading.Thread(target=follow, args=(keys[i % 4],), daemon=True)
               for i in range(80)]
    for thread in threads:
        thread.start()
    time.sleep(3)  # let the flood open its streams: a load, not an assertion
    during = latency_ms(victim, "/v1/runs?limit=5")
    stop.set()
    victim.close()
    refused = sum(1 for s in statuses if s in (429, 503))
    return row("10", "80 follows from 4 keys", during <= 5 * before + 100,
               f"other tenant p50 {before:.1f} ms before, {during:.1f} ms during; "
               f"{refused} of {len(statuses)} follows refused (429/503)")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def list_load(bench: Stack, api_pid: int, client: httpx.Client) -> Row:
    nested = {"k": [{} for _ in range(180_000)]}  # about 1 MiB of nested empty objects
    for _ in range(200):
        bench.store.create_run(NewRun(tenant="bench", processor="echo", version="1.0.0",
                                      image=IMAGE, queue="nobody-serves", input=nested,
                                      timeout_seconds=30, max_attempts=1,
                                      manifest_revision="bench"))
    before = rss_kib(api_pid)
    peak = before
    for _ in range(10):
        client.get("/v1/runs", params={"limit": 200})
        peak = max(peak, rss_kib(api_pid))
    return row("11", "list 200 runs of 1 MiB inputs x10", peak - before < 200 * 1024,
               f"API RSS {before / 1024:.0f} MiB before, {peak / 1024:.0f} MiB peak")


def retention(bench: Stack) -> Row:
    store, lifecycle = bench.store, Lifecycle(bench.store)
    for _ in range(500):
        run, _ = store.create_run(NewRun(tenant="old", processor="echo", version="1.0.0",
                                         image=IMAGE, queue="nobody-serves", input={},
                                         timeout_seconds=30, max_attempts=1,
                                         manifest_revision="bench"))
        lifecycle.end_queued(run.id, RunStatus.CANCELED, error_code=ErrorCode.CANCELED,
                             message="old", stage="queue")
    cutoff = utcnow()
    started = time.perf_counter()
    deleted = 0
    while done := store.prune_runs_ended_before(cutoff=cutoff, batch=100):
        deleted += done
    seconds = time.perf_counter() - started
    return row("12", "prune 500+ ended runs, 100 a batch", deleted >= 500,
               f"{deleted} runs deleted in {seconds:.2f} s ({deleted / seconds:.0f}/s)")


def small_ones(url: str, client: httpx.Client) -> list[Row]:
    nul = client.get("/v1/runs/abc%00def")
    cursor = client.get("/v1/runs", params={"cursor": "a\x00b"})
    codes = []
    with httpx.Client(base_url=url, timeout=10) as anonymous:
        for i in range(40):
            codes.append(anonymous.get("/v1/runs", headers={
                "Authorization": f"Bearer rk_nokey{i:04d}_{'x' * 32}"}).status_code)
    limited = codes.count(429)
    return [row("13", "NUL in a run id", nul.status_code == 404, f"HTTP {nul.status_code}"),
            row("13", "NUL in a cursor", cursor.status_code == 422,
                f"HTTP {cursor.status_code}"),
            row("13", "40 unknown keys from one address", limited > 0,
                f"{codes.count(401)} x 401, then {limited} x 429")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Also write the rows to this file.")
    args = parser.parse_args()
    client = docker.from_env()
    entries = publish_samples(["echo", "sleep"], client)
    for name in ("fillup", "nanresult"):
        entry_ = publish(ROOT / "tests" / "processors" / name, registry="127.0.0.1:5000",
                         client=client, local_base=True)
        entries[entry_["name"]] = entry_
    entries["capped"] = {**entries["echo"], "name": "capped", "max_concurrency": 5}
    entries["pattern"] = {**entries["echo"], "name": "pattern", "input_schema": {
        "type": "object", "properties": {"text": {"type": "string", "pattern": "^(a+)+$"}}}}
    # Plain copies: shared objects would be written as YAML anchors, which a manifest
    # refuses.
    entries = json.loads(json.dumps(entries))
    rows: list[Row] = []
    print(f"{'#':>3}  {'case':<34} {'result':<9} figure")
    rows += manifest_cases()
    with stack(list(entries.values())) as bench:
        api = bench.start_api()
        bench.start_worker("w1")
        assert api.url is not None
        with httpx.Client(base_url=api.url, timeout=120,
                          headers={"Authorization": f"Bearer {bench.key}"}) as http:
            cases: list[Callable[[], Any]] = [
                lambda: run_flood(http, int(entries["fillup"]["limits"]["output_bytes"]
                                            .rstrip("Mi")) * 1024 * 1024),
                lambda: tmp_writable(http),
                lambda: strict_results(http),
                lambda: redos(http),
                lambda: capacity(bench),
                lambda: list_load(bench, api.pid, http),
                lambda: retention(bench),
                lambda: small_ones(api.url or "", http),
            ]
            long_run = submit(http, "sleep", {"seconds": 20}).json()["id"]
            cases.insert(5, lambda: follow_flood(bench, api.url or "", long_run))
            for case in cases:
                try:
                    found = case()
                except (RunnerError, httpx.HTTPError, KeyError, ValueError,
                        AssertionError) as exc:
                    found = row("?", getattr(case, "__name__", "case"), False,
                                f"could not run: {type(exc).__name__}: {exc}"[:200])
                rows += found if isinstance(found, list) else [found]
    held = sum(r["held"] for r in rows)
    print(f"\n{held} of {len(rows)} cases held")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
