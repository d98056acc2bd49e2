"""`make bench`: the runner next to bare Docker, side by side, on this machine.

Measures, in one process run and interleaved so the machine's state hits all alike:

- B1: `docker run --rm` of the echo sample with the runner's limits and lockdown;
- B2: a bare docker-py loop (create, put input, start, wait, logs, remove) with the
  runner's exact create arguments, at concurrency 1 and 2;
- the runner end to end: POST /v1/runs until GET shows the terminal status, with 1
  and 2 worker processes, at concurrency 1 and 2; and each figure's ratio to B2;
- API load: POST /v1/runs latency at 100 requests/s open loop on one `runner api`
  process on PostgreSQL, and the highest sustained rate;
- queue overhead: dequeue -> container create call, from the workers' histogram.

Prints a table and writes bench/results/<timestamp>.json and .md. See
docs/benchmarks.md for what each figure means.

    python bench/suite.py [--quick] [--runs 100] [--profile] [--scale]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import stack as bench_stack
from bench.apiload import api_load
from bench.batches import goal_values as batch_goals
from bench.batches import render as render_batches
from bench.batches import run_all as run_batches
from bench.stack import BENCH_LABEL, parse_metrics, quantile
from runner.manifest import Processor, load_manifest
from runner.sandbox import (
    ATTEMPT_LABEL,
    CONTAINER_TMP,
    RUN_LABEL,
    WORKER_LABEL,
    ContainerSpec,
    Sandbox,
    SandboxConfig,
)
from runner.sandbox.transfer import input_archive
from tests.support.processes import RunnerProcess

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TERMINAL = {"succeeded", "failed", "timed_out", "canceled", "dead_letter"}
INPUT = {"message": "bench"}
# Generous so the load tests measure the API, not its limits (enabled, so their
# Redis and database round trips are part of what is measured).
API_LIMITS = {"key_requests_per_second": 1_000_000,
              "tenant_submissions_per_minute": 100_000_000,
              "tenant_max_active_runs": 10_000_000}


# Statistics ---------------------------------------------------------------

@dataclass
class Series:
    """Latencies of one configuration, and the wall time of the blocks they ran in."""

    name: str
    latencies: list[float] = field(default_factory=list)
    recorded: list[float] = field(default_factory=list)  # runner: submit -> finished_at
    wall: float = 0.0
    api_cpu: float = 0.0  # CPU seconds the API and the workers used in the blocks
    worker_cpu: float = 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": len(self.latencies),
            "p50_ms": round(quantile(self.latencies, 0.5) * 1000, 1),
            "p99_ms": round(quantile(self.latencies, 0.99) * 1000, 1),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 1)
            if self.latencies else None,
            "throughput_per_s": round(len(self.latencies) / self.wall, 3) if self.wall else None,
        }
        if self.recorded:
            out["recorded_p50_ms"] = round(quantile(self.recorded, 0.5) * 1000, 1)
            out["recorded_p99_ms"] = round(quantile(self.recorded, 0.99) * 1000, 1)
            out["api_cpu_ms_per_run"] = round(self.api_cpu / len(self.latencies) * 1000, 1)
            out["worker_cpu_ms_per_run"] = round(self.worker_cpu / len(self.latencies) * 1000,
                                                 1)
        return out


# The machine ----------------------------------------------------------------

def machine(client: docker.DockerClient) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    info = client.info()
    return {
        "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024**2, 1), "kernel": platform.release(),
        "os": platform.platform(), "docker": client.version().get("Version"),
        "storage_driver": info.get("Driver"), "cgroup": info.get("CgroupVersion"),
        "python": platform.python_version(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


# B1 and B2 ------------------------------------------------------------------

class Baselines:
    """Bare Docker with the runner's image, limits and lockdown."""

    def __init__(self, client: docker.DockerClient, processor: Processor, tag: str) -> None:
        self.client, self.processor, self.tag = client, processor, tag
        # Same SandboxConfig defaults the runner uses (user, tmpfs size); an instance
        # name no reconciler owns, so nobody else ever touches these containers.
        self.sandbox = Sandbox(client, SandboxConfig(instance=f"bench-{tag}"))
        # A bare docker-py script puts /run on a plain volume: B2 has no bounded /run
        # filesystem (the runner's runfs, made per attempt), whose cost the runner's
        # figures therefore include and B2's do not.
        self.sandbox._bound_problem = "baseline: a plain /run volume"
        self.api = self.sandbox.api
        self.image_id = self.api.inspect_image(processor.image)["Id"]
        self._count = 0
        self._lock = threading.Lock()
        self.stages: dict[str, list[float]] = {}  # B2's own per-call timings, ms

    def _name(self) -> str:
        with self._lock:
            self._count += 1
            return f"bench-{self.tag}-{self._count}"

    def docker_run(self) -> float:
        """B1: `docker run --rm`. The input reaches /run through a shell (the CLI has
        no put-archive before start), so /run is a tmpfs owned by the container user."""
        limits = self.processor.limits
        log_max = max(limits.log_bytes * 2, 1024 * 1024)
        script = ("printf '%s' \"$BENCH_INPUT\" > /run/input.json && mkdir -p /run/out "
                  "&& exec python3 /app/main.py")
        name = self._name()
        command = [
            "docker", "run", "--rm", "--name", name, "--label", f"{BENCH_LABEL}={self.tag}",
            "--user", self.sandbox.config.user, "--network", "none", "--read-only", "--init",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--cpus", str(limits.cpus), "--memory", str(limits.memory_bytes),
            "--memory-swap", str(limits.memory_bytes), "--pids-limit", str(limits.pids),
            "--tmpfs", f"{CONTAINER_TMP}:rw,noexec,nosuid,nodev,"
                       f"size={self.sandbox.config.tmp_size_bytes}",
            "--tmpfs", "/run:rw,nosuid,nodev,uid=65532,gid=65532,size=4m",
            "--log-driver", "json-file", "--log-opt", f"max-size={log_max}",
            "--log-opt", "max-file=2", "--workdir", CONTAINER_TMP,
            "-e", f"BENCH_INPUT={json.dumps(INPUT)}", "-e", f"RUNNER_RUN_ID={name}",
            "-e", "RUNNER_ATTEMPT=1", "--entrypoint", "/bin/sh", self.image_id, "-c", script,
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"B1 docker run failed: {done.stderr.decode()[-500:]}")
        return elapsed

    def docker_py(self) -> float:
        """B2: create -> put input -> start -> wait -> logs -> remove, the runner's kwargs."""
        limits = self.processor.limits
        name = self._name()
        spec = ContainerSpec(
            name=name, image=self.processor.image, cpus=limits.cpus,
            memory_bytes=limits.memory_bytes, pids_limit=limits.pids,
            timeout_seconds=limits.timeout_seconds, log_cap_bytes=limits.log_bytes,
            input_json=json.dumps(INPUT).encode(),
            environment={"RUNNER_RUN_ID": name, "RUNNER_ATTEMPT": "1"},
            labels={RUN_LABEL: name, ATTEMPT_LABEL: "1", WORKER_LABEL: f"bench-{self.tag}",
                    BENCH_LABEL: self.tag})
        config = self.sandbox.config
        marks = [time.perf_counter()]
        created = self.api.create_container(
            image=self.image_id, name=name, user=config.user,
            environment=dict(spec.environment), labels=self.sandbox._labels(spec),
            host_config=self.sandbox._host_config(spec), working_dir=CONTAINER_TMP,
            network_disabled=True)
        container = created["Id"]
        marks.append(time.perf_counter())
        try:
            self.api.put_archive(container, "/run", input_archive(spec.input_json, 65532, 65532))
            self.api.start(container)
            marks.append(time.perf_counter())
            status = self.api.wait(container, timeout=60)
            marks.append(time.perf_counter())
            self.api.logs(container, stdout=True, stderr=True)
            marks.append(time.perf_counter())
        finally:
            self.api.remove_container(container, v=True, force=True)
        marks.append(time.perf_counter())
        elapsed = marks[-1] - marks[0]
        if len(marks) == 6:
            with self._lock:
                for stage, begin, end in zip(("create", "start", "wait", "logs", "remove"),
                                             marks, marks[1:], strict=False):
                    self.stages.setdefault(stage, []).append((end - begin) * 1000)
        if status.get("StatusCode") != 0:
            raise RuntimeError(f"B2 container exited {status}")
        return elapsed


# The runner end to end ------------------------------------------------------

class EndToEnd:
    """Submit through the API, then GET (long poll or plain polling) until the run's
    status is terminal."""

    def __init__(self, api_url: str, key: str, processor: str, poll: float) -> None:
        self.url, self.key, self.processor, self.poll = api_url, key, processor, poll
        self._local = threading.local()
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def _http(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(base_url=self.url, timeout=60,
                                  headers={"Authorization": f"Bearer {self.key}"})
            self._local.client = client
        return client

    def _error(self, what: str, response: httpx.Response) -> None:
        with self._lock:
            self.errors.append(f"{what}: HTTP {response.status_code} {response.text[:300]}")
            if len(self.errors) > 200:
                raise RuntimeError(f"the API keeps failing: {self.errors[-3:]}")

    def run(self) -> tuple[float, float]:
        """Observed latency (submit -> terminal status seen) and recorded latency
        (submit -> the run's finished_at, as the worker stored it). An API error is
        counted and the request repeated (its time stays in the latency)."""
        http = self._http()
        wall = time.time()
        started = time.perf_counter()
        while True:
            response = http.post("/v1/runs", json={"processor": self.processor,
                                                   "input": INPUT})
            if response.status_code == 202:
                break
            self._error("POST /v1/runs", response)
            time.sleep(0.1)
        run_id = response.json()["id"]
        # poll == 0: the API's long poll (GET ?wait=), answered as soon as the run ends;
        # otherwise a plain GET every `poll` seconds.
        params = {"wait": "30"} if self.poll == 0 else None
        while True:
            response = http.get(f"/v1/runs/{run_id}", params=params)
            if response.status_code == 200:
                run = response.json()
                if run["status"] in TERMINAL:
                    break
            else:
                self._error("GET /v1/runs/{id}", response)
            time.sleep(self.poll)
        elapsed = time.perf_counter() - started
        if run["status"] != "succeeded":
            raise RuntimeError(f"run {run_id} ended {run['status']}: {run.get('error_message')}")
        finished = datetime.fromisoformat(run["finished_at"]).timestamp()
        return elapsed, finished - wall


def run_block(operation: Callable[[], Any], series: Series, count: int,
              concurrency: int) -> None:
    """`count` operations by `concurrency` closed-loop threads; latencies into `series`."""
    remaining = [count]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop() -> None:
        while True:
            with lock:
                if remaining[0] <= 0 or errors:
                    return
                remaining[0] -= 1
            try:
                value = operation()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors.append(exc)
                return
            with lock:
                if isinstance(value, tuple):
                    series.latencies.append(value[0])
                    series.recorded.append(value[1])
                else:
                    series.latencies.append(value)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    series.wall += time.perf_counter() - started
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # b1, b2, e2e
    concurrency: int
    workers: int = 0
    baseline: str | None = None


CONFIGS = [
    Config("B1 docker run c=1", "b1", 1),
    Config("B2 docker-py c=1", "b2", 1),
    Config("B2 docker-py c=2", "b2", 2),
    Config("runner 1 worker c=1", "e2e", 1, workers=1, baseline="B2 docker-py c=1"),
    Config("runner 1 worker c=2", "e2e", 2, workers=1, baseline="B2 docker-py c=2"),
    Config("runner 2 workers c=1", "e2e", 1, workers=2, baseline="B2 docker-py c=1"),
    Config("runner 2 workers c=2", "e2e", 2, workers=2, baseline="B2 docker-py c=2"),
]


def ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out = {}
    for config in CONFIGS:
        if config.baseline is None:
            continue
        ours, base = summaries[config.name], summaries[config.baseline]

        def ratio(key: str, ours: dict[str, Any] = ours, base: dict[str, Any] = base
                  ) -> float | None:
            if not ours.get(key) or not base.get(key):
                return None
            return round(ours[key] / base[key], 3)

        out[config.name] = {"vs": config.baseline, "p50": ratio("p50_ms"),
                            "p99": ratio("p99_ms"), "throughput": ratio("throughput_per_s"),
                            "recorded_p50": (round(ours["recorded_p50_ms"] / base["p50_ms"], 3)
                                             if ours.get("recorded_p50_ms") else None)}
    return out


def goals(ratio: dict[str, dict[str, float | None]], api: dict[str, Any] | None,
          queue_overhead: dict[str, Any] | None, *,
          cpu: dict[str, dict[str, Any]] | None = None,
          batches: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    def check(name: str, value: float | None, limit: float, above: bool = False
              ) -> dict[str, Any]:
        if value is None:
            verdict = "n/a"
        else:
            verdict = "met" if (value >= limit if above else value <= limit) else "missed"
        return {"goal": name, "value": value, "limit": limit, "verdict": verdict}

    one, two = ratio["runner 1 worker c=1"], ratio["runner 2 workers c=2"]
    out = [
        check("e2e p50 <= 1.05x B2 (1 worker, c=1)", one["p50"], 1.05),
        check("e2e p99 <= 1.10x B2 (1 worker, c=1)", one["p99"], 1.10),
        check("throughput 2 workers c=2 >= 1.05x B2 c=2", two["throughput"], 1.05,
              above=True),
        check("p50 2 workers c=2 <= 1.0x B2 c=2", two["p50"], 1.0),
        check("p99 2 workers c=2 <= 1.0x B2 c=2", two["p99"], 1.0),
    ]
    out.append(check("API POST p99 <= 20 ms at 100 req/s",
                     api["open_loop"][0]["p99_ms"] if api else None, 20.0))
    out.append(check("API POST closed loop >= 300/s (one process)",
                     api["closed_loop"]["throughput_per_s"] if api else None, 300.0,
                     above=True))
    out.append(check("queue overhead p50 <= 10 ms",
                     queue_overhead.get("p50_ms") if queue_overhead else None, 10.0))
    for name, s in (cpu or {}).items():
        out.append(check(f"worker CPU per run <= 12 ms ({name})",
                         s.get("worker_cpu_ms_per_run"), 12.0))
        out.append(check(f"API CPU per run <= 8 ms ({name})", s.get("api_cpu_ms_per_run"),
                         8.0))
    for name, value, limit, above in batch_goals(batches or {}):
        out.append(check(name, value, limit, above=above))
    return out


# Queue overhead and stage timings --------------------------------------------

DEQUEUE_METRIC = "runner_dequeue_to_create_seconds"


def scrape(url: str | None) -> list[tuple[str, dict[str, str], float]] | None:
    if url is None:
        return None
    try:
        response = httpx.get(f"{url}/metrics", timeout=5)
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


def queue_overhead(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """p50 of dequeue -> create from the workers' histograms, over the measured runs."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for name, samples in after.items():
        if samples is None:
            continue
        later, later_sum, later_count = bench_stack.histogram(samples, DEQUEUE_METRIC)
        earlier, earlier_sum, earlier_count = bench_stack.histogram(before.get(name) or [],
                                                                    DEQUEUE_METRIC)
        for bound, value in bench_stack.subtract(later, earlier):
            buckets[bound] = buckets.get(bound, 0.0) + value
        total += later_sum - earlier_sum
        count += later_count - earlier_count
    if not count:
        scraped = any(s is not None for s in after.values())
        return {"p50_ms": None, "source": "worker /metrics",
                "note": (f"{DEQUEUE_METRIC} not exposed by the workers" if scraped
                         else "worker metrics port not serving (RUNNER_WORKER_PORT)")}
    ordered = sorted(buckets.items())
    p50 = bench_stack.histogram_quantile(ordered, 0.5)
    p99 = bench_stack.histogram_quantile(ordered, 0.99)
    return {"p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
            "mean_ms": round(total / count * 1000, 2), "count": int(count),
            "source": f"{DEQUEUE_METRIC} (bucket-interpolated)"}


def worker_events(logs: list[str]) -> list[dict[str, Any]]:
    events = []
    for text in logs:
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
    return events


def stage_timings(events: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """p50/p99 per stage from the workers' `container_finished` events (`stages_ms`,
    `total_ms`) and the dequeue -> create figure on `container.created`."""
    stages: dict[str, list[float]] = {}
    for event in events:
        name = event.get("event")
        values: dict[str, Any] = {}
        if name == "container_finished":
            values = {**(event.get("stages_ms") or {}), "total": event.get("total_ms")}
        elif name == "container.created" and "dequeue_to_create_ms" in event:
            values = {"dequeue_to_create": event["dequeue_to_create_ms"]}
        for stage, value in values.items():
            with contextlib.suppress(TypeError, ValueError):
                stages.setdefault(stage, []).append(float(value))
    return {name: {"n": len(v), "p50_ms": round(quantile(v, 0.5), 1),
                   "p99_ms": round(quantile(v, 0.99), 1)} for name, v in stages.items()}


def cpu_seconds(services: list[RunnerProcess]) -> float:
    """User + system CPU time of processes so far (their children not included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for service in services:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{service.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


# Profiles -------------------------------------------------------------------

def profile_worker(worker: RunnerProcess, e2e: EndToEnd, runs: int, out: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """The 1-worker c=1 test once more with py-spy attached to the worker: wall time
    per job on its critical path, by where it goes."""
    from bench import profiling

    if not profiling.available():
        return {"error": "py-spy is not installed: var/venv/bin/pip install py-spy"}
    spy = profiling.Spy(worker.pid, out, idle=True)
    series = Series("profiled")
    try:
        run_block(e2e.run, series, runs, 1)
    finally:
        spy.stop()
    summary = profiling.summarise(out, rate=spy.rate, per=runs, worker=True)
    summary["e2e_while_profiled"] = series.summary()
    summary["raw"] = str(out.relative_to(ROOT))
    log(f"  worker profile: {summary['ms_total']} ms per job sampled, raw stacks in "
        f"{summary['raw']}")
    return summary


def profile_api(api: RunnerProcess, url: str, key: str, processor: str, out: Path,
                log: Callable[[str], None], rate: float = 50, seconds: float = 10
                ) -> dict[str, Any]:
    """POST /v1/runs at a rate the API sustains, py-spy on the API: CPU per request."""
    from bench import profiling
    from bench.apiload import run_open_loop

    if not profiling.available():
        return {"error": "py-spy is not installed: var/venv/bin/pip install py-spy"}
    spy = profiling.Spy(api.pid, out, idle=False)
    try:
        step = run_open_loop(url, key, processor, rate, seconds)
    finally:
        spy.stop()
    summary = profiling.summarise(out, rate=spy.rate, per=step["ok"], worker=False)
    summary["load"] = step
    summary["raw"] = str(out.relative_to(ROOT))
    log(f"  API profile: {summary['ms_total']} ms CPU per POST, raw stacks in "
        f"{summary['raw']}")
    return summary


# Output ---------------------------------------------------------------------

def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(result: dict[str, Any]) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"# runner benchmark {result['started_at']}")
    lines.append(f"# {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, kernel "
                 f"{m['kernel']}, Docker {m['docker']} ({m['storage_driver']}, cgroup "
                 f"{m['cgroup']}), Python {m['python']}, load "
                 f"{' '.join(f'{x:.2f}' for x in m['load_avg_start'])}")
    poll_ms = result['settings']['poll_ms']
    waiting = "long-poll GET ?wait=" if not poll_ms else f"{poll_ms} ms GET poll"
    lines.append(f"# echo sample, {waiting}, "
                 f"{result['settings']['rounds_done']} interleaved rounds")
    lines.append("")
    header = (f"{'configuration':<24}{'n':>5}{'p50 ms':>9}{'p99 ms':>9}{'runs/s':>8}"
              f"{'rec p50':>9}{'x p50':>7}{'x p99':>7}{'x tput':>8}")
    lines.append(header)
    lines.append("-" * len(header))
    for config in CONFIGS:
        s = result["latency"][config.name]
        r = result["ratios"].get(config.name, {})
        lines.append(f"{config.name:<24}{s['n']:>5}{fmt(s['p50_ms']):>9}{fmt(s['p99_ms']):>9}"
                     f"{fmt(s['throughput_per_s'], 2):>8}{fmt(s.get('recorded_p50_ms')):>9}"
                     f"{fmt(r.get('p50'), 2):>7}{fmt(r.get('p99'), 2):>7}"
                     f"{fmt(r.get('throughput'), 2):>8}")
    lines.append("(x = runner / B2 at the same concurrency; rec p50 = submit -> finished_at "
                 "as recorded, without the poll)")
    errors = {k: v for k, v in (result.get("api_errors") or {}).items() if v["count"]}
    for name, seen in errors.items():
        lines.append(f"API errors seen by the e2e client ({name}), each retried: "
                     f"{seen['count']}, first: {seen['first'][0]}")
    api = result.get("api_load")
    if api:
        lines.append("")
        lines.append("API POST /v1/runs, one `runner api` process, PostgreSQL, no workers")
        lines.append(f"{'load':<30}{'p50 ms':>9}{'p99 ms':>9}{'ok/s':>9}{'errors':>8}")
        for step in api["open_loop"]:
            label = f"open loop {step['rate']:g}/s {step['duration_s']:g}s"
            lines.append(f"{label:<30}{fmt(step['p50_ms'], 2):>9}{fmt(step['p99_ms'], 2):>9}"
                         f"{fmt(step['achieved_per_s']):>9}"
                         f"{sum(step['errors'].values()) if step['errors'] else 0:>8}")
        closed = api["closed_loop"]
        label = f"closed loop {closed['concurrency']} conns"
        lines.append(f"{label:<30}{fmt(closed['p50_ms'], 2):>9}{fmt(closed['p99_ms'], 2):>9}"
                     f"{fmt(closed['throughput_per_s']):>9}{closed['errors']:>8}")
        lines.append(f"highest sustained open-loop rate (p99 <= 20 ms, no errors): "
                     f"{fmt(api['highest_sustained_per_s'], 0)}/s (steps stop at the first "
                     f"failure)")
    lines.append("")
    cpu = [(c.name.replace("runner ", ""), result["latency"][c.name]) for c in CONFIGS
           if c.kind == "e2e"]
    lines.append("CPU per run, ms: " + ", ".join(
        f"{name}: API {fmt(s.get('api_cpu_ms_per_run'))} worker "
        f"{fmt(s.get('worker_cpu_ms_per_run'))}" for name, s in cpu))
    q = result.get("queue_overhead") or {}
    if q.get("p50_ms") is not None:
        lines.append(f"queue overhead (dequeue -> create call): p50 {q['p50_ms']} ms, "
                     f"p99 {q['p99_ms']} ms, mean {q['mean_ms']} ms over {q['count']} jobs "
                     f"(histogram); p50 {fmt(q.get('log_p50_ms'))} ms from the log events")
    else:
        lines.append(f"queue overhead: n/a ({q.get('note')}); from the log events: "
                     f"p50 {fmt(q.get('log_p50_ms'))} ms")
    stages = result.get("stages") or {}
    if stages:
        lines.append("worker stages p50/p99 ms (log events, measured runs): " + ", ".join(
            f"{name} {v['p50_ms']:.0f}/{v['p99_ms']:.0f}" for name, v in stages.items()))
    b2 = result.get("b2_stages") or {}
    if b2:
        lines.append("B2 calls p50/p99 ms (start = put input + start): " + ", ".join(
            f"{name} {v['p50_ms']:.0f}/{v['p99_ms']:.0f}" for name, v in b2.items()))
    if result.get("batches"):
        lines.append("")
        lines.extend(render_batches(result["batches"]))
    lines.append("")
    lines.append("goals")
    for goal in result["goals"]:
        lines.append(f"  {goal['verdict']:<7} {goal['goal']:<66} value {fmt(goal['value'], 3)}")
    from bench.profiling import render as render_profile

    for key, title in (("profile_worker", "worker profile"), ("profile_api", "API profile")):
        summary = result.get(key)
        if summary and "categories" in summary:
            lines.append("")
            lines.extend(render_profile(summary, title))
        elif summary:
            lines.append(f"{title}: {summary.get('error')}")
    if result.get("scale"):
        lines.append("")
        lines.append(result["scale"].get("text", ""))
    lines.append("")
    lines.append(f"containers left: {result['containers_left']}; elapsed "
                 f"{result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def write_results(result: dict[str, Any], text: str, stamp: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    m = result["machine"]
    md = io.StringIO()
    md.write(f"# Benchmark {result['started_at']}\n\n")
    md.write("| machine | |\n|---|---|\n")
    for key in ("host", "cpu", "cores", "ram_gib", "kernel", "os", "docker", "storage_driver",
                "cgroup", "python", "load_avg_start", "load_avg_end"):
        md.write(f"| {key} | {m.get(key)} |\n")
    md.write(f"\nCommand: `{' '.join(result['argv'])}`\n\n```\n{text}\n```\n")
    path = RESULTS / f"{stamp}.md"
    path.write_text(md.getvalue())
    return path


# Main -----------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="latency samples per configuration (default 100, quick 30)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds the samples are split into")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the latency rounds before stopping early "
                             "(default 330, quick 120)")
    parser.add_argument("--poll-ms", type=float, default=0.0,
                        help="GET poll interval of the end-to-end client; 0 (the default) "
                             "uses the API's long poll, GET /v1/runs/{id}?wait=")
    parser.add_argument("--api-seconds", type=float, default=None,
                        help="duration of the 100 req/s API test (default 30, quick 10)")
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter load")
    parser.add_argument("--skip-api", action="store_true")
    parser.add_argument("--skip-batches", action="store_true",
                        help="leave out the batch rate and the fairness measurement")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a worker and the API with py-spy "
                             "(var/venv/bin/pip install py-spy)")
    parser.add_argument("--profile-runs", type=int, default=40)
    parser.add_argument("--scale", action="store_true",
                        help="also run bench/scale.py (about 10 more minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    runs = args.runs or (30 if args.quick else 100)
    budget = args.budget or (120.0 if args.quick else 330.0)
    api_seconds = args.api_seconds or (10.0 if args.quick else 30.0)
    step_seconds = 5.0 if args.quick else 8.0
    closed_seconds = 5.0 if args.quick else 10.0
    poll = args.poll_ms / 1000

    began = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)

    client = docker.from_env(timeout=120)
    tag = secrets.token_hex(3)
    log(f"bench {tag}: publishing the echo sample to {bench_stack.REGISTRY}")
    echo = bench_stack.publish_samples(["echo"], client)["echo"]
    # One processor per worker pool, same image and limits, routed to its own queue.
    entries = [{**echo, "name": "echo-1w", "queue": f"bench-{tag}-1w"},
               {**echo, "name": "echo-2w", "queue": f"bench-{tag}-2w"},
               {**echo, "name": "echo-load", "queue": f"bench-{tag}-load"}]
    result: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                              "argv": sys.argv, "tag": tag, "machine": machine(client)}
    with bench_stack.stack(entries, tag=tag, keep=args.keep) as stack:
        processor = load_manifest(stack.manifest).find("echo-1w")
        assert processor is not None
        baselines = Baselines(client, processor, tag)
        log(f"stack up: database {stack.database}, redis :{stack.redis.port}, "
            f"dir {stack.dir}")
        api = stack.start_api(**API_LIMITS)
        workers = {1: [stack.start_worker("w1", queue=f"bench-{tag}-1w")],
                   2: [stack.start_worker(f"w2{x}", queue=f"bench-{tag}-2w") for x in "ab"]}
        log(f"api {api.url}, workers up ({sum(len(w) for w in workers.values())})")
        e2e = {n: EndToEnd(api.url, stack.key, f"echo-{n}w", poll) for n in (1, 2)}

        def operation(config: Config) -> Callable[[], Any]:
            if config.kind == "b1":
                return baselines.docker_run
            if config.kind == "b2":
                return baselines.docker_py
            return e2e[config.workers].run

        log("warm-up")
        for config in CONFIGS:
            run_block(operation(config), Series("warm"), 2 * config.concurrency,
                      config.concurrency)
        scrapes_before = {w.name: scrape(w.url) for ws in workers.values() for w in ws}
        baselines.stages.clear()
        measured_from = datetime.now(UTC).isoformat()
        series = {c.name: Series(c.name) for c in CONFIGS}
        per_round = max(1, runs // args.rounds)
        rounds_done = 0
        latency_began = time.monotonic()
        for index in range(args.rounds):
            # Rotate the order each round, so no configuration always follows another.
            order = CONFIGS[index % len(CONFIGS):] + CONFIGS[:index % len(CONFIGS)]
            for config in order:
                pool = workers.get(config.workers, [])
                api_before, pool_before = cpu_seconds([api]), cpu_seconds(pool)
                run_block(operation(config), series[config.name], per_round,
                          config.concurrency)
                if config.kind == "e2e":
                    series[config.name].api_cpu += cpu_seconds([api]) - api_before
                    series[config.name].worker_cpu += cpu_seconds(pool) - pool_before
            rounds_done += 1
            spent = time.monotonic() - latency_began
            log(f"round {rounds_done}/{args.rounds} done ({spent:.0f}s): " + ", ".join(
                f"{c.name.split(' c=')[0].replace('runner ', '')}"
                f"{'/c' + str(c.concurrency)} "
                f"{quantile(series[c.name].latencies, 0.5) * 1000:.0f}ms" for c in CONFIGS))
            if spent / rounds_done * (rounds_done + 1) > budget and index + 1 < args.rounds:
                log(f"stopping after {rounds_done} rounds: the next would pass the "
                    f"{budget:g}s budget")
                break
        scrapes_after = {w.name: scrape(w.url) for ws in workers.values() for w in ws}
        result["queue_overhead"] = queue_overhead(scrapes_before, scrapes_after)
        events = [e for e in worker_events([w.log() for ws in workers.values() for w in ws])
                  if str(e.get("ts", "")) >= measured_from[:26]]
        result["stages"] = stage_timings(events)
        result["b2_stages"] = {name: {"n": len(v), "p50_ms": round(quantile(v, 0.5), 1),
                                      "p99_ms": round(quantile(v, 0.99), 1)}
                               for name, v in baselines.stages.items()}
        if "dequeue_to_create" in result["stages"]:
            result["queue_overhead"]["log_p50_ms"] = result["stages"]["dequeue_to_create"][
                "p50_ms"]
        summaries = {name: s.summary() for name, s in series.items()}
        result["api_errors"] = {f"{n} worker(s)": {"count": len(c.errors),
                                                   "first": c.errors[:5]}
                                for n, c in e2e.items()}
        result["latency"] = summaries
        result["ratios"] = ratios(summaries)
        result["settings"] = {"runs_target": runs, "rounds": args.rounds,
                              "rounds_done": rounds_done, "per_round": per_round,
                              "poll_ms": args.poll_ms, "budget_s": budget}
        if args.profile:
            log(f"profiling the worker over {args.profile_runs} runs (1 worker, c=1)")
            RESULTS.mkdir(exist_ok=True)
            result["profile_worker"] = profile_worker(
                workers[1][0], e2e[1], args.profile_runs,
                RESULTS / f"{stamp}-worker.pyspy.txt", log)
        for pool in workers.values():
            for worker in pool:
                stack.stop(worker)
        stack.stop(api)
        if not args.skip_api:
            log("API load (workers stopped: runs only queue)")
            load_api = stack.start_api("api-load", **API_LIMITS)
            result["api_load"] = api_load(load_api.url, stack.key, "echo-load",
                                          duration=api_seconds, step_seconds=step_seconds,
                                          rates=[150, 200, 300, 400, 600, 800],
                                          closed_seconds=closed_seconds, log=log)
            if args.profile:
                log("profiling the API at 50 POST/s")
                result["profile_api"] = profile_api(
                    load_api, load_api.url, stack.key, "echo-load",
                    RESULTS / f"{stamp}-api.pyspy.txt", log)
            stack.stop(load_api)
        if not args.skip_batches:
            log("batches and fairness (bench/batches.py)")
            result["batches"] = run_batches(stack, quick=args.quick, processor="echo-1w",
                                            queue=f"bench-{tag}-1w", log=log)
        time.sleep(1)
        left = [c.name for c in stack.containers(client)]
        left += [c.name for c in bench_stack.bench_containers(client, tag)]
        result["containers_left"] = len(left)
        if left:
            log(f"containers left over: {left}")
            for container in stack.containers(client) + bench_stack.bench_containers(
                    client, tag):
                with contextlib.suppress(docker.errors.DockerException):
                    container.remove(force=True, v=True)
    result["goals"] = goals(result["ratios"], result.get("api_load"),
                            result.get("queue_overhead"),
                            cpu={c.name.replace("runner ", ""): result["latency"][c.name]
                                 for c in CONFIGS if c.kind == "e2e"},
                            batches=result.get("batches"))
    if args.scale:
        log("scale tests (bench/scale.py)")
        from bench.scale import run_scale

        result["scale"] = run_scale(log=log)
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    text = render(result)
    print()
    print(text)
    path = write_results(result, text, stamp)
    print(f"\nresults: {path.relative_to(ROOT)} and {path.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
