"""Capacity by simulation: how many runs per second one control plane sustains.

Not a test; the measured figure behind docs/scaling.md. It starts its own stack
(bench/stack.py: a scratch PostgreSQL database on the shared server, a throwaway Redis,
one `runner api` process) and drives it with simulated worker hosts.

A simulated host is what one `runner worker` process is (one slot), with the real code
on every path but the container: an RQ SimpleWorker loop (`RunnerWorker`: dequeue →
`worker.perform` → `Executor.execute`), the real `Ledger` and `Lifecycle` on PostgreSQL
(read, claim, container record, output, finish and its run-end notice, lease renewals
by the real `AttemptGuard`), services built by the real `WorkerServices` wiring, and a
reconciler loop of its own (the requeue pass every 0.5 s, a full pass every 5 s under
the Redis lock), as each worker process runs. Only the sandbox is simulated:
`SimSandbox`, a `SandboxPort` whose container "runs" by sleeping (200 ms by default),
prints one line and exits 0 with a result. Hosts run as threads, HOSTS_PER_PROCESS to a
`python -m bench.capacity host` process, eight processes. Submissions go over HTTP:
client threads POST /v1/runs (four tenants), keeping the RQ queue a few jobs per host
deep, so runs wait well under the reconcile grace.

Steps: 4, 8, 16, 32, 64 hosts x 1 slot with 200 ms runs; 64 hosts with 5 s runs (lease
renewals); 64 idle hosts (what a worker process costs doing nothing); 64 hosts beside
500 queued runs older than the reconcile grace on a queue no host serves (the requeue
pass's worst case: every pass of every host reads them). Each step reports runs/s, the
`Ledger.claim` latency (p50, p99), POST /v1/runs, and the CPU each part spent (API,
this database's PostgreSQL backends, Redis, the hosts) per run; from the steps, the
cost of a run, of a lease renewal and of a worker process's second.

Compromises of the simulation: hosts of one process share one database pool (12
connections, no overflow: the shared server allows 200) and one GIL; the control
plane, the hosts and the clients share this machine's cores, so the CPU per unit of
work is the figure to carry to other machines, the rate is this machine's.

About 3 minutes (`make bench-capacity`). `--save` writes
bench/results/<UTC timestamp>-capacity.json and .md; `--profile` adds a step sampled
by py-spy (the API and one host process, CPU per request / per run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker
import httpx
import psycopg
from redis import Redis
from rq.timeouts import TimerDeathPenalty
from sqlalchemy.engine import make_url

from bench.profiling import Spy, summarise
from bench.stack import ROOT, Stack, quantile, stack
from bench.suite import API_LIMITS, machine
from runner.control.files import catalog_for
from runner.control.keys import Keys
from runner.control.lanes import LaneQueue
from runner.control.ledger import Ledger
from runner.control.lifecycle import Claim, ClaimStatus, Heartbeat, Lifecycle
from runner.control.notify import RunEndNotice
from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.domain import Finish, NewRun, Role
from runner.execution.files import WorkerFiles
from runner.execution.wiring import WorkerServices
from runner.execution.worker import (
    REQUEUE_SECONDS,
    RunnerWorker,
    current_executor,
    fair_queues,
)
from runner.manifest import ManifestSource
from runner.observability.logsetup import configure_logging
from runner.observability.telemetry import NullStages, StageObserver
from runner.sandbox import (
    ArtifactSink,
    CollectedResult,
    ContainerSpec,
    LogSink,
    Outcome,
    ResultStatus,
    SandboxConfig,
)
from runner.sandbox.provenance import expected_settings
from runner.settings import load_settings

Row = dict[str, Any]
IMAGE = "127.0.0.1:5000/processors/sim@sha256:" + "c" * 64  # never pulled
IMAGE_ID = "sha256:" + "d" * 64
RESULT, LOG_LINE = b'{"ok": true}', b"simulated run: done\n"
ENTRY = {"name": "sim", "version": "1.0.0", "image": IMAGE, "limits": {"timeout": "60s"}}
LADDER, RUN_MS, HOSTS_PER_PROCESS, PROCESSES = (4, 8, 16, 32, 64), 200, 8, 8
P99_GOAL_MS, AGED_RUNS, AGED_QUEUE = 50.0, 500, "capacity-nobody"
TENANTS, CLIENT_THREADS, HOST_POOL = 4, 16, 12
BEGAN = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - BEGAN:6.1f}s] {message}", flush=True)


# The simulated host side (python -m bench.capacity host) ---------------------------

class Pace:
    """How long a simulated container runs; shared by a process's hosts, changed by
    the parent between steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class SimSandbox:
    """A `SandboxPort` whose container sleeps, prints a line and exits 0 with a result,
    calling back as the real one does: receipt (the real expected settings, so the
    provenance row is full size), start, one log chunk, the end."""

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def run(self, spec: ContainerSpec, *, on_log: LogSink,
            on_start: Callable[[str, str], None] | None = None,
            stages: StageObserver | None = None,
            on_receipt: Callable[[dict[str, Any]], None] | None = None,
            artifacts: ArtifactSink | None = None) -> Outcome:
        observer: StageObserver = stages or NullStages()
        container_id, stopped = uuid.uuid4().hex, threading.Event()
        with self._lock:
            self._stops[container_id] = stopped
        began = time.monotonic()
        try:
            with observer.stage("create", container_name=spec.name):
                applied = expected_settings(spec, SandboxConfig(), IMAGE_ID, bounded=False)
            with observer.stage("start", input_bytes=len(spec.input_json)):
                if on_receipt is not None:
                    on_receipt({"pinned": spec.image, "image_id": IMAGE_ID, "applied": applied,
                                "mismatches": [], "verified_at": datetime.now(UTC).isoformat()})
            if on_start is not None:
                on_start(container_id, IMAGE_ID)
            on_log(LOG_LINE)
            with observer.stage("wait", timeout_s=spec.timeout_seconds):
                killed = stopped.wait(self.pace.seconds)
            result = (CollectedResult(ResultStatus.ABSENT) if killed else
                      CollectedResult(ResultStatus.OK, data=RESULT, size=len(RESULT)))
            return Outcome(container_id=container_id, image_id=IMAGE_ID,
                           exit_code=137 if killed else 0, oom_killed=False, timed_out=False,
                           duration_seconds=time.monotonic() - began,
                           log_bytes=len(LOG_LINE), log_truncated=False, result=result)
        finally:
            with self._lock:
                self._stops.pop(container_id, None)

    def stop(self, container_id: str) -> None:
        with self._lock:
            event = self._stops.get(container_id)
        if event is not None:
            event.set()

    def remove(self, container_id: str) -> None:
        self.stop(container_id)

    def managed_containers(self, **label_filters: str) -> list[dict[str, Any]]:
        return []  # an engine call on the worker host, not the control plane

    def managed_volumes(self) -> list[dict[str, Any]]:
        return []

    def remove_volume(self, name: str) -> None:
        pass

    def prefetch(self, refs: list[str]) -> dict[str, str]:
        return {}

    def drain(self, timeout: float = 30) -> bool:
        return True

    def ping(self) -> None:
        pass

    def check_engine(self) -> None:
        pass


Samples = dict[str, list[tuple[float, float]]]  # name -> [(wall clock at the end, seconds)]


class TimedLedger(Ledger):
    """The real Ledger, timing the calls the figures are about."""

    def __init__(self, store: Store, lifecycle: Lifecycle) -> None:
        super().__init__(store, lifecycle)
        self.samples: Samples = {n: [] for n in ("claim", "not_claimed", "finish",
                                                 "heartbeat", "requeue")}

    def note(self, name: str, began: float) -> None:
        self.samples[name].append((time.time(), time.perf_counter() - began))

    # Pass-throughs: the figures need the time of each call, not its arguments.
    def claim(self, run_id: str, **options: Any) -> Claim:
        began = time.perf_counter()
        claim = super().claim(run_id, **options)
        self.note("claim" if claim.status is ClaimStatus.CLAIMED else "not_claimed", began)
        return claim

    def heartbeat(self, run_id: str, attempt: int, **options: Any) -> Heartbeat:
        began = time.perf_counter()
        beat = super().heartbeat(run_id, attempt, **options)
        self.note("heartbeat", began)
        return beat

    def finish(self, run_id: str, attempt: int, outcome: Finish, **options: Any) -> bool:
        began = time.perf_counter()
        done = super().finish(run_id, attempt, outcome, **options)
        self.note("finish", began)
        return done


class HostWorker(RunnerWorker):
    """`RunnerWorker` in a thread: RQ's timer death penalty (SIGALRM belongs to the main
    thread) and no signal handlers (the process exits as a whole)."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        pass


def serve_host(services: WorkerServices) -> None:
    """One host: the RQ loop of `runner worker`, on the wiring's own executor."""
    current_executor.set(services.executor())
    redis = services.queue.redis
    worker = HostWorker(fair_queues(services.settings, redis, [services.settings.queue]),
                        connection=redis, name=f"{services.settings.worker_id}-{os.getpid()}",
                        queue_class=LaneQueue)
    worker.work(logging_level="WARNING", with_scheduler=False)


def reconcile_host(services: WorkerServices, ledger: TimedLedger) -> None:
    """The reconciler thread of `runner worker`: requeue pass every 0.5 s, a full pass
    every interval (one process at a time, by the Redis lock)."""
    reconciler, interval = services.reconciler(), services.settings.reconcile_interval_seconds
    reconciler.run_once()
    next_pass = time.monotonic() + interval
    while True:
        time.sleep(REQUEUE_SECONDS)
        try:
            if time.monotonic() >= next_pass:
                next_pass = time.monotonic() + interval
                reconciler.run_once()
            else:
                began = time.perf_counter()
                reconciler.requeue_due()
                ledger.note("requeue", began)
        except Exception as exc:  # noqa: BLE001 - the loop outlives a bad pass, as the worker's
            print(f"reconcile failed: {exc!r}", file=sys.stderr, flush=True)


def host_main(out: Path) -> None:
    """Commands on stdin, one a line, each answered `ok`: `hosts N` (run N hosts here),
    `run-ms N` (the simulated run time), `dump` (write the samples to `out`), `exit`."""
    # stdout answers the parent; anything a library prints goes to the log (stderr).
    reply, sys.stdout = sys.stdout, sys.stderr
    settings = load_settings()
    configure_logging(service="worker", fmt="json", level="warning")
    # One pool for the process's hosts, never above HOST_POOL (the server is shared):
    # without overflow, no connection is opened and closed per query under load.
    store = Store(settings.database_url, pool_size=HOST_POOL, max_overflow=0)
    notices = RunQueue.from_url(settings.redis_url)
    ledger = TimedLedger(store, Lifecycle(store, listeners=[
        RunEndNotice(notices.redis, settings.instance)]))
    manifests, files = ManifestSource(settings.manifest), WorkerFiles(catalog_for(settings, store))
    pace, hosts = Pace(RUN_MS / 1000), 0
    print("ready", file=reply, flush=True)
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "exit":
            break
        if command == "hosts":
            for index in range(hosts, int(value)):
                services = WorkerServices(
                    settings=settings.model_copy(update={
                        "worker_id": f"sim-{os.getpid()}-{index}",
                        "host_id": f"sim-{os.getpid()}-{index}"}),
                    store=store, queue=RunQueue.from_url(settings.redis_url), ledger=ledger,
                    manifests=manifests, sandbox=SimSandbox(pace), files=files)
                threading.Thread(target=serve_host, args=(services,), daemon=True).start()
                threading.Thread(target=reconcile_host, args=(services, ledger),
                                 daemon=True).start()
            hosts = max(hosts, int(value))
        elif command == "run-ms":
            pace.seconds = float(value) / 1000
        elif command == "dump":
            out.write_text(json.dumps(ledger.samples))
        print("ok", file=reply, flush=True)
    os._exit(0)  # the hosts' threads are mid-run; the stack is thrown away


# The bench side ---------------------------------------------------------------------

class Hosts:
    """The simulated host processes, and how many hosts each runs."""

    def __init__(self, bench: Stack, processes: int) -> None:
        env = bench.env(file_dir=bench.dir / "files", log_format="json", log_level="warning")
        self.logs = [(bench.dir / f"host-{i}.log").open("wb") for i in range(processes)]
        self.outs = [bench.dir / f"host-{i}.json" for i in range(processes)]
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.capacity", "host", "--out", str(out)], cwd=ROOT,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
            for out, log in zip(self.outs, self.logs, strict=True)]
        self.counts = [0] * processes
        for proc in self.procs:
            self._expect(proc, "ready")

    @staticmethod
    def _expect(proc: subprocess.Popen[str], word: str) -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"host process {proc.pid} said {line!r}, not {word!r} "
                               f"(see its log)")

    def _send(self, proc: subprocess.Popen[str], line: str) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        self._expect(proc, "ok")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def scale(self, total: int) -> None:
        """`total` hosts, spread evenly over the processes (hosts are only added)."""
        n = len(self.procs)
        for i, proc in enumerate(self.procs):
            want = min(total // n + (1 if i < total % n else 0), HOSTS_PER_PROCESS)
            if want > self.counts[i]:
                self._send(proc, f"hosts {want}")
                self.counts[i] = want

    def pace(self, run_ms: float) -> None:
        for proc in self.procs:
            self._send(proc, f"run-ms {run_ms}")

    def samples(self) -> list[Samples]:
        """Each process's samples so far."""
        for proc in self.procs:
            self._send(proc, "dump")
        return [json.loads(out.read_text()) for out in self.outs]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write("exit\n")
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for log in self.logs:
            log.close()


class Feeder:
    """Client threads keeping the RQ queue `target` jobs deep with POST /v1/runs."""

    def __init__(self, url: str, keys: list[str], redis_url: str, queue: str) -> None:
        self.target, self.depth = 0, 0
        self.posts: list[tuple[float, float, int]] = []  # (wall clock at the end, s, status)
        self.depths: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._queue, self._name = RunQueue.from_url(redis_url), queue
        self._threads = [threading.Thread(target=self._post, args=(url, keys[i % len(keys)]),
                                          daemon=True) for i in range(CLIENT_THREADS)]
        self._threads.append(threading.Thread(target=self._watch, daemon=True))
        for thread in self._threads:
            thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.depth = self._queue.depths([self._name])[self._name]
            self.depths.append((time.time(), self.depth))

    def _post(self, url: str, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                if self.depth >= self.target:
                    time.sleep(0.005)
                    continue
                n += 1
                began = time.perf_counter()
                try:
                    status = client.post("/v1/runs", json={"processor": "sim",
                                                           "input": {"n": n}}).status_code
                except httpx.HTTPError:
                    status = 0
                self.posts.append((time.time(), time.perf_counter() - began, status))
                self.depth += 1  # roughly right until the next LLEN

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """CPU seconds of each part, this database's commits and Redis's commands."""

    def __init__(self, bench: Stack, api_pid: int, host_pids: list[int]) -> None:
        dsn = make_url(bench.database_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.redis = Redis.from_url(bench.redis.url)
        assert bench.redis.process is not None
        self.pids = {"api": [api_pid], "redis": [bench.redis.process.pid],
                     "hosts": host_pids, "clients": [os.getpid()]}

    def read(self) -> Row:
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        backends = [r[0] for r in self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]
        commits, sessions = self.conn.execute(
            "SELECT xact_commit, sessions FROM pg_stat_database "
            "WHERE datname = current_database()").fetchone() or (0, 0)
        stats: Any = self.redis.info("stats")
        commands: Any = self.redis.info("commandstats")
        return {"t": time.time(), "commits": commits, "sessions": sessions,
                "redis_commands": stats["total_commands_processed"],
                "redis_by_command": {k.removeprefix("cmdstat_"): v["calls"]
                                     for k, v in commands.items()},
                "pg": {pid: cpu_seconds(pid) for pid in backends},
                **{k: sum(cpu_seconds(p) for p in pids) for k, pids in self.pids.items()}}

    def close(self) -> None:
        self.conn.close()
        self.redis.close()


def delta_cpu(start: Row, end: Row) -> dict[str, float]:
    found = {k: end[k] - start[k] for k in ("api", "redis", "hosts", "clients")}
    found["pg"] = sum(v - start["pg"].get(pid, 0.0) for pid, v in end["pg"].items())
    return found


def drain(feeder: Feeder, timeout: float = 60) -> None:
    """Wait until the hosts have taken every queued job."""
    deadline = time.monotonic() + timeout
    while feeder.depth and time.monotonic() < deadline:
        time.sleep(0.1)


def age_backlog(bench: Stack, count: int) -> None:
    """`count` queued runs on a queue no host serves, held in Redis: once older than the
    reconcile grace, every requeue pass of every host reads them (up to 500)."""
    queue = RunQueue.from_url(bench.redis.url)
    for i in range(count):
        run, _ = bench.store.create_run(NewRun(
            tenant="aged", processor="sim", version="1.0.0", image=IMAGE, queue=AGED_QUEUE,
            input={"n": i}, timeout_seconds=60, max_attempts=1, manifest_revision="bench"))
        queue.enqueue(run)
    queue.redis.close()


def window(samples: list[Samples], name: str, t0: float, t1: float) -> list[float]:
    return [s * 1000 for proc in samples for t, s in proc[name] if t0 <= t < t1]


def figures(step: Row, samples: list[Samples], feeder: Feeder) -> Row:
    t0, t1, span = step["t0"], step["t1"], step["t1"] - step["t0"]
    claims, finishes = window(samples, "claim", t0, t1), window(samples, "finish", t0, t1)
    beats, requeue = window(samples, "heartbeat", t0, t1), window(samples, "requeue", t0, t1)
    posts = [(s * 1000, code) for t, s, code in feeder.posts if t0 <= t < t1]
    post_ms = [s for s, code in posts if code == 202]
    depths = [d for t, d in feeder.depths if t0 <= t < t1] or [0]
    # The bench's own LLEN of the queue (every 20 ms) is not the control plane's.
    redis_before = dict(step["start"]["redis_by_command"], llen=step["start"]["redis_by_command"]
                        .get("llen", 0) + len(depths))
    cpu, runs = delta_cpu(step["start"], step["end"]), len(finishes)

    def pct(values: list[float], q: float) -> float | None:
        return round(quantile(values, q), 1) if values else None

    return {
        "step": step["name"], "hosts": step["hosts"], "run_ms": step["run_ms"],
        "seconds": round(span, 1), "runs_per_s": round(len(finishes) / span, 1),
        "claims_per_s": round(len(claims) / span, 1),
        "ideal_per_s": round(step["hosts"] / (step["run_ms"] / 1000), 1),
        "not_claimed": len(window(samples, "not_claimed", t0, t1)),
        "claim_p50_ms": pct(claims, 0.5), "claim_p99_ms": pct(claims, 0.99),
        "finish_p50_ms": pct(finishes, 0.5), "finish_p99_ms": pct(finishes, 0.99),
        "heartbeats_per_s": round(len(beats) / span, 1), "heartbeat_p99_ms": pct(beats, 0.99),
        "requeue_passes_per_s": round(len(requeue) / span, 1),
        "requeue_p50_ms": pct(requeue, 0.5), "requeue_p99_ms": pct(requeue, 0.99),
        "posts_per_s": round(len(post_ms) / span, 1), "post_p50_ms": pct(post_ms, 0.5),
        "post_p99_ms": pct(post_ms, 0.99), "post_errors": len(posts) - len(post_ms),
        "depth_mean": round(sum(depths) / len(depths), 1),
        "depth_empty_pct": round(100 * sum(1 for d in depths if d == 0) / len(depths)),
        "cores": {k: round(v / span, 2) for k, v in cpu.items()},
        "cpu_ms_per_run": {k: round(1000 * v / runs, 2) if runs else None
                           for k, v in cpu.items()},
        "commits_per_s": round((step["end"]["commits"] - step["start"]["commits"]) / span, 1),
        "redis_commands_per_s": round((step["end"]["redis_commands"]
                                       - step["start"]["redis_commands"] - len(depths)) / span, 1),
        "sessions_per_s": round((step["end"]["sessions"] - step["start"]["sessions"]) / span, 1),
        "redis_commands_per_run": {
            k: round((v - redis_before.get(k, 0)) / runs, 1)
            for k, v in sorted(step["end"]["redis_by_command"].items(),
                               key=lambda kv: redis_before.get(kv[0], 0) - kv[1])
            if runs and v > redis_before.get(k, 0)},
    }


def num(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{value:,.1f}':>{width}}"


def render(rows: list[Row]) -> list[str]:
    lines = [" step            hosts    run  runs/s  ideal  claim p50      p99  finish p99  "
             "POST/s  POST p99  depth  empty  beats/s  beat p99  requeue p99",
             "-" * 143]
    for r in rows:
        lines.append(
            f" {r['step']:<15} {r['hosts']:>5} {r['run_ms']:>5.0f}ms {num(r['runs_per_s'], 7)}"
            f"{num(r['ideal_per_s'], 7)} {num(r['claim_p50_ms'], 10)}{num(r['claim_p99_ms'], 9)}"
            f"{num(r['finish_p99_ms'], 12)}{num(r['posts_per_s'], 8)}"
            f"{num(r['post_p99_ms'], 10)}{num(r['depth_mean'], 7)}{r['depth_empty_pct']:>6}%"
            f"{num(r['heartbeats_per_s'], 9)}{num(r['heartbeat_p99_ms'], 10)}"
            f"{num(r['requeue_p99_ms'], 13)}")
    lines += ["", f" CPU: cores used (this machine has {os.cpu_count()}), CPU ms per run, "
              "PostgreSQL commits and Redis commands per second",
              " step            hosts   api    pg  redis  hosts  clients | ms/run: api     pg  "
              "redis  hosts | commits/s  redis cmds/s  connects/s", "-" * 143]
    for r in rows:
        c, m = r["cores"], r["cpu_ms_per_run"]
        lines.append(
            f" {r['step']:<15} {r['hosts']:>5} {c['api']:>5.2f} {c['pg']:>5.2f} "
            f"{c['redis']:>6.2f} {c['hosts']:>6.2f} {c['clients']:>8.2f} |"
            f"{num(m['api'], 12)}{num(m['pg'], 7)}{num(m['redis'], 7)}{num(m['hosts'], 7)} |"
            f"{num(r['commits_per_s'], 10)}{num(r['redis_commands_per_s'], 14)}"
            f"{num(r['sessions_per_s'], 12)}")
    return lines


def profile_lines(profile: Row) -> list[str]:
    """Where the on-CPU samples of the API and of one host process went, in shares."""
    lines = ["", "py-spy, on-CPU samples of the profiled step, by category (and top functions):"]
    for name, summary in profile.items():
        total = sum(summary["categories"].values()) or 1.0
        lines.append(f"  {name}: " + ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in summary["categories"].items()
            if 100 * v / total >= 1))
        for f in summary["functions"][:8]:
            spent = ", ".join(part.rsplit(" ", 1)[0] for part in f["breakdown"].split(", "))
            lines.append(f"    {100 * f['ms'] / total:>4.0f}%  {f['function']}  [{spent}]")
    return lines


def best(rows: list[Row]) -> Row | None:
    """The ladder step with the highest rate whose claim p99 is under the goal."""
    held = [r for r in rows if r["step"] == "ladder" and r["claim_p99_ms"] is not None
            and r["claim_p99_ms"] < P99_GOAL_MS]
    return max(held, key=lambda r: r["runs_per_s"]) if held else None


UNITS = (("api", "api ms"), ("pg", "pg ms"), ("redis", "redis ms"), ("hosts", "hosts ms"),
         ("commits_per_s", "commits"), ("redis_commands_per_s", "redis cmds"))


def unit_costs(rows: list[Row]) -> Row | None:
    """What each unit of work costs, separated with the steps: a worker process's second
    (the idle step), a run (a ladder step, less that background) and a lease renewal
    (the renewal step, less both). CPU in ms, commits and Redis commands in counts."""
    by = {r["step"]: r for r in rows}
    idle, renewals = by.get("idle"), by.get("lease renewals")
    ladder = [r for r in rows if r["step"] == "ladder" and r["runs_per_s"]]
    if not (idle and renewals and ladder and renewals["heartbeats_per_s"]):
        return None
    ref = best(rows) or max(ladder, key=lambda r: r["runs_per_s"])

    def per_s(r: Row, key: str) -> float:
        return 1000 * r["cores"][key] if key in r["cores"] else float(r[key])

    keys = [k for k, _ in UNITS]
    process = {k: per_s(idle, k) / idle["hosts"] for k in keys}
    run = {k: (per_s(ref, k) - ref["hosts"] * process[k]) / ref["runs_per_s"] for k in keys}
    renewal = {k: (per_s(renewals, k) - renewals["hosts"] * process[k]
                   - renewals["runs_per_s"] * run[k]) / renewals["heartbeats_per_s"]
               for k in keys}
    return {"reference_step": f"ladder, {ref['hosts']} hosts",
            "per_run": {k: round(v, 2) for k, v in run.items()},
            "per_lease_renewal": {k: round(v, 2) for k, v in renewal.items()},
            "per_process_second": {k: round(v, 2) for k, v in process.items()}}


def unit_lines(units: Row) -> list[str]:
    head = "".join(f"{label:>11}" for _, label in UNITS)
    lines = ["", f" per unit of work{'':<33}{head}", "-" * 116]
    for key, label in (("per_run", f"a run ({units['reference_step']}, less background)"),
                       ("per_lease_renewal", "a lease renewal (renewal step, less the rest)"),
                       ("per_process_second", "a worker process, one second (idle step)")):
        lines.append(f" {label:<48}" + "".join(f"{units[key][k]:>11.2f}" for k, _ in UNITS))
    return lines


def measure(args: argparse.Namespace) -> tuple[list[Row], Row]:
    info: Row = {}
    with stack([ENTRY], queue="capacity") as bench:
        keys = [Keys(bench.store).create(tenant=f"tenant-{i}", role=Role.SUBMITTER)[1]
                for i in range(TENANTS)]
        api = bench.start_api(**API_LIMITS, file_dir=bench.dir / "files",
                              api_database_pool_size=CLIENT_THREADS + 4,
                              api_database_max_overflow=0)
        hosts = Hosts(bench, PROCESSES)
        say(f"stack up: api pid {api.pid}, {PROCESSES} host processes {hosts.pids}")
        feeder = Feeder(str(api.url), keys, bench.redis.url, bench.queue)
        meter = Meter(bench, api.pid, hosts.pids)
        steps: list[Row] = []

        def step(name: str, count: int, run_ms: float, *, warmup: float,
                 before: Callable[[], None] | None = None, profile: bool = False,
                 depth: int | None = None) -> None:
            hosts.scale(count)
            # A few jobs per host, and never much more than a second of work: runs
            # wait well under the reconcile grace (past it, every requeue pass reads them).
            feeder.target = (round(min(2 * count, count / (run_ms / 1000))) + 8
                             if depth is None else depth)
            if before is not None:
                before()
            time.sleep(warmup)
            spies = [Spy(api.pid, bench.dir / "api.raw", idle=False),
                     Spy(hosts.pids[0], bench.dir / "host.raw", idle=False)] if profile else []
            start, t0 = meter.read(), time.time()
            time.sleep(args.window)
            t1, end = time.time(), meter.read()
            for spy in spies:
                spy.stop()
            steps.append({"name": name, "hosts": count, "run_ms": run_ms, "t0": t0, "t1": t1,
                          "start": start, "end": end, "profiled": profile})
            say(f"{name}: {count} hosts x {run_ms:.0f} ms done")

        def aged() -> None:
            age_backlog(bench, AGED_RUNS)
            time.sleep(max(0.0, bench.settings.reconcile_grace_seconds + 1.5 - args.warmup))

        top = max(args.ladder)
        try:
            for count in args.ladder:
                step("ladder", count, RUN_MS, warmup=args.warmup)
            if args.profile:
                step("profiled", top, RUN_MS, warmup=1, profile=True)
            hosts.pace(args.long_ms)
            step("lease renewals", top, args.long_ms, warmup=args.warmup + 3)
            hosts.pace(RUN_MS)
            step("idle", top, RUN_MS, warmup=args.long_ms / 1000 + 1, depth=0,
                 before=lambda: drain(feeder))
            step("aged backlog", top, RUN_MS, warmup=args.warmup, before=aged)
            samples = hosts.samples()
        finally:
            feeder.stop()
            meter.close()
            hosts.close()
        rows = [figures(s, samples, feeder) for s in steps]
        if not any(r["runs_per_s"] for r in rows):
            raise RuntimeError(f"no run finished: see the host logs in {bench.dir}")
        for s in steps:
            if s["profiled"]:
                requests = sum(1 for t, _, c in feeder.posts if s["t0"] <= t < s["t1"])
                runs = sum(1 for t, _ in samples[0]["finish"] if s["t0"] <= t < s["t1"])
                info["profile"] = {
                    "api": summarise(bench.dir / "api.raw", rate=100, per=requests,
                                     worker=False),
                    "host": summarise(bench.dir / "host.raw", rate=100, per=runs,
                                      worker=False)}
        info["database"], info["processes"] = bench.database, PROCESSES
    return rows, info


def report(result: Row) -> str:
    """The text of one result (printed, and kept in the .md)."""
    rows, top, units, host = result["rows"], result["best"], result["units"], result["machine"]
    verdict = (f"highest sustained rate with claim p99 under {P99_GOAL_MS:.0f} ms: "
               f"{top['runs_per_s']} runs/s ({top['claims_per_s']} claims/s + as many "
               f"finishes) at {top['hosts']} hosts x 1 slot, claim p99 {top['claim_p99_ms']} ms"
               if top else f"no ladder step held claim p99 under {P99_GOAL_MS:.0f} ms")
    return "\n".join([
        f"# capacity by simulation {result['started_at']}", *render(rows),
        *(unit_lines(units) if units else []),
        "", verdict, *([] if top is None else [
            "Redis commands per run there: " + ", ".join(
                f"{k} {v}" for k, v in list(top["redis_commands_per_run"].items())[:12])]),
        *(profile_lines(result["info"]["profile"]) if "profile" in result["info"] else []),
        f"\nload average {host['load_avg_start']} at start, {host['load_avg_end']} at end; "
        f"elapsed {result['elapsed_s']} s"])


def write_markdown(out: Path, result: Row) -> None:
    table = "".join(f"| {k} | {v} |\n" for k, v in result["machine"].items())
    out.with_suffix(".md").write_text(
        f"# Capacity by simulation {result['started_at']}\n\n| machine | |\n|---|---|\n"
        f"{table}\nCommand: `{' '.join(result['argv'])}`\n\n```\n{report(result)}\n```\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true",
                        help="Write bench/results/<UTC timestamp>-capacity.json and .md.")
    parser.add_argument("--ladder", type=int, nargs="+", default=list(LADDER),
                        help=f"hosts per step (at most {HOSTS_PER_PROCESS * PROCESSES})")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured a step")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each")
    parser.add_argument("--long-ms", type=float, default=5000.0,
                        help="run time of the lease-renewal step")
    parser.add_argument("--profile", action="store_true",
                        help="add a step sampled by py-spy (API and one host process)")
    sub = parser.add_subparsers(dest="role")
    host = sub.add_parser("host", help="(internal) a process of simulated hosts")
    host.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.role == "host":
        host_main(args.out)
        return 0
    configure_logging(service="bench", fmt="json", level="warning")
    started_at, began = datetime.now(UTC), time.monotonic()
    client = docker.from_env(timeout=60)
    try:
        host_info = machine(client)
    finally:
        client.close()
    rows, info = measure(args)
    host_info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    top, units = best(rows), unit_costs(rows)
    result = {"started_at": started_at.isoformat(timespec="seconds"), "argv": sys.argv,
              "elapsed_s": round(time.monotonic() - began), "machine": host_info,
              "info": info, "best": top, "units": units, "rows": rows}
    text = report(result)
    print(f"\n{text}")
    if args.save:
        stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
        out = ROOT / "bench" / "results" / f"{stamp}-capacity.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(out, result)
        print(f"\nresults: {out.relative_to(ROOT)} and {out.with_suffix('.md').name}")
    return 0 if top else 1


if __name__ == "__main__":
    sys.exit(main())
