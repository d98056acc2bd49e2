"""Soak: many runs while workers are SIGKILLed at random; count what went wrong.

Reports runs lost (not succeeded), runs executed twice at the same time (two live
containers for one run at any sample), containers left over, and how long a killed
worker's run took to start again elsewhere. Uses the services from
scripts/services.sh, its own PostgreSQL database and its own queue, and the sample
images pinned by `runner dev up` (var/dev/manifest.yaml).

    python bench/soak.py [--runs 200] [--workers 3] [--kill-every 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import docker
import psycopg
import yaml

from runner.control.batches import submit_batch
from runner.control.lifecycle import Lifecycle
from runner.control.migrate import upgrade
from runner.control.queue import RunQueue
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.domain import Priority, Run
from runner.errors import RunnerError
from runner.manifest import load_manifest
from runner.sandbox import MANAGED_LABEL, RUN_LABEL, WORKER_LABEL
from runner.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
PG = "postgresql://runner:runner@127.0.0.1:5439/runner"
BATCH = 25


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--manifest", type=Path, default=ROOT / "var/dev/manifest.yaml")
    args = parser.parse_args()
    tag = secrets.token_hex(3)
    work = ROOT / "var" / "soak" / tag
    work.mkdir(parents=True)

    if args.manifest.exists():
        found = load_manifest(args.manifest).find("sleep")
        image = found.image if found is not None else None
    else:  # no `runner dev up` here: build and pin the sample as the benchmarks do
        sys.path.insert(0, str(ROOT))
        from bench.stack import publish_samples

        image = publish_samples(["sleep"], docker.from_env())["sleep"]["image"]
    assert image is not None, f"no sleep processor in {args.manifest}"
    manifest = work / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"version": 1, "processors": [{
        "name": "soak", "version": "1", "image": image,
        "limits": {"cpus": 0.2, "memory": "16Mi", "pids": 8, "timeout": "60s"},
        "retry": {"max_attempts": 20, "backoff": {"initial": "100ms", "max": "1s"},
                  "on": ["worker_lost", "docker_unavailable"]}}]}))
    database = f"runner_soak_{tag}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = f"postgresql://runner:runner@127.0.0.1:5439/{database}"
    upgrade(url.replace("postgresql://", "postgresql+psycopg://"))
    env = {**os.environ, "RUNNER_DATABASE_URL": url, "RUNNER_MANIFEST": str(manifest),
           "RUNNER_QUEUE": f"soak-{tag}", "RUNNER_LEASE_SECONDS": "5",
           "RUNNER_HEARTBEAT_SECONDS": "0.5", "RUNNER_RECONCILE_INTERVAL_SECONDS": "1",
           "RUNNER_RECONCILE_GRACE_SECONDS": "2", "RUNNER_STOP_GRACE_SECONDS": "1",
           "RUNNER_LOG_FORMAT": "json"}
    settings = load_settings(database_url=url, manifest=manifest, queue=f"soak-{tag}")
    store = Store(settings.database_url)
    queue = RunQueue.from_url(settings.redis_url)
    client = docker.from_env()

    workers: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
    generation = defaultdict(int)
    kills: dict[str, float] = {}

    def spawn(slot: int) -> None:
        generation[slot] += 1
        worker_id = f"soak-{tag}-w{slot}-g{generation[slot]}"
        log = (work / f"{worker_id}.log").open("wb")
        workers[slot] = (worker_id, subprocess.Popen(
            [sys.executable, "-m", "runner", "worker"], cwd=ROOT,
            env={**env, "RUNNER_WORKER_ID": worker_id}, stdout=log, stderr=subprocess.STDOUT))

    for slot in range(args.workers):
        spawn(slot)
    time.sleep(3)
    started = time.monotonic()
    manifest_now = load_manifest(manifest)
    options: dict[str, Any] = {"manifest": manifest_now, "store": store, "queue": queue,
                               "default_queue": settings.queue, "stop_grace_seconds": 1}

    def seconds() -> dict[str, float]:
        return {"seconds": round(random.uniform(0.2, 1.5), 2)}

    # Half one by one, half in batches of two tenants with mixed priorities, each batch
    # sent twice with its items' keys (a client retrying after a lost answer): the
    # second must return the same runs and queue nothing more.
    singles = args.runs // 2
    ids = [submit(Submission(tenant="soak", processor="soak", version=None,
                             input=seconds()), **options).id for _ in range(singles)]
    resent_differently = 0
    for first in range(singles, args.runs, BATCH):
        tenant = random.choice(["soak", "soak-b"])
        items: list[Submission | RunnerError] = [Submission(
            tenant=tenant, processor="soak", version=None, input=seconds(),
            priority=random.choice(list(Priority)), idempotency_key=f"{tag}-{n}")
            for n in range(first, min(first + BATCH, args.runs))]
        made = submit_batch(items, admit=lambda n: n, **options)
        again = submit_batch(items, admit=lambda n: n, **options)
        assert all(isinstance(r, Run) for r in made), made
        resent_differently += sum(not isinstance(b, Run) or b.id != a.id
                                  for a, b in zip(made, again, strict=True)
                                  if isinstance(a, Run))
        ids.extend(r.id for r in made if isinstance(r, Run))
    wanted = set(ids)

    stop = threading.Event()
    overlaps: set[str] = set()

    def watch() -> None:  # two live containers for one run at once = double execution
        while not stop.is_set():
            live: dict[str, int] = defaultdict(int)
            for c in client.containers.list(sparse=True, filters={"label": MANAGED_LABEL}):
                run_id = (c.attrs.get("Labels") or {}).get(RUN_LABEL)
                if run_id in wanted:
                    live[run_id] += 1
            overlaps.update(r for r, n in live.items() if n > 1)
            time.sleep(0.1)

    def killer() -> None:
        while not stop.wait(random.uniform(0.5, 1.5) * args.kill_every):
            slot = random.randrange(args.workers)
            worker_id, process = workers[slot]
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills[worker_id] = time.time()
            spawn(slot)

    threads = [threading.Thread(target=watch, daemon=True),
               threading.Thread(target=killer, daemon=True)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        runs = [store.get_run(i) for i in ids]
        if all(r is not None and r.status.terminal for r in runs):
            break
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(5)
    elapsed = time.monotonic() - started
    for _, process in workers.values():
        process.terminate()
        process.wait(30)

    runs = [store.get_run(i) for i in ids]
    succeeded = sum(1 for r in runs if r is not None and r.status.value == "succeeded")
    # Recovered = the killed attempt is ended and its run queued again (lease expiry +
    # reconcile); restarted = its next attempt began (adds the wait in a busy queue).
    recoveries: list[float] = []
    restarts: list[float] = []
    double_success = 0
    for run_id in ids:
        attempts = store.attempts(run_id)
        double_success += sum(1 for a in attempts if a["status"] == "succeeded") > 1
        for before, after in itertools.pairwise(attempts):
            if before["error_code"] == "worker_lost" and before["worker_id"] in kills:
                killed = kills[before["worker_id"]]
                recoveries.append(before["finished_at"].timestamp() - killed)
                restarts.append(after["started_at"].timestamp() - killed)
    Lifecycle(store).release_stale_slots()
    time.sleep(3)
    left = [c for c in client.containers.list(all=True, sparse=True,
                                              filters={"label": MANAGED_LABEL})
            if (c.attrs.get("Labels") or {}).get(WORKER_LABEL, "").startswith(f"soak-{tag}")]
    report: dict[str, Any] = {
        "runs": args.runs, "batched": args.runs - singles,
        "batch_resends_answered_differently": resent_differently,
        "workers": args.workers, "worker_kills": len(kills),
        "elapsed_s": round(elapsed, 1), "succeeded": succeeded,
        "runs_lost": args.runs - succeeded,
        "runs_executed_twice_at_once": len(overlaps),
        "runs_with_two_successful_attempts": double_success,
        "containers_left": len(left), "recovered_runs": len(recoveries),
        "recovered_s_p50": round(statistics.median(recoveries), 2) if recoveries else None,
        "recovered_s_max": round(max(recoveries), 2) if recoveries else None,
        "restarted_s_p50": round(statistics.median(restarts), 2) if restarts else None,
        "restarted_s_max": round(max(restarts), 2) if restarts else None,
    }
    lines = [f"{k}: {v}" for k, v in report.items()]
    print("\n".join(lines))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "soak.txt").write_text(
        f"# soak {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cpus\n"
        + "\n".join(lines) + "\n")
    store.close()
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    if report["runs_lost"] or overlaps or left or double_success or resent_differently:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
