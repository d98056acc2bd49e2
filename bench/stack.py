"""An isolated runner stack for benchmarks: its own database, Redis, manifest and processes.

Everything is named after one tag, so a benchmark never touches another user's state on
the shared servers: a PostgreSQL database `runner_bench_<tag>` on the shared server
(created and dropped here), a throwaway `redis-server` on a free loopback port, a
manifest in a temporary directory pinning the sample images by digest, and `runner api`
/ `runner worker` processes started and stopped here.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import redis
import yaml

from runner.authoring.publish import publish
from runner.control.keys import Keys
from runner.control.migrate import upgrade
from runner.control.store import Store
from runner.domain import Role
from runner.sandbox import INSTANCE_LABEL, MANAGED_LABEL
from runner.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("RUNNER_BENCH_PG_URL", "postgresql://runner:runner@127.0.0.1:5439/runner")
REGISTRY = os.environ.get("RUNNER_BENCH_REGISTRY", "127.0.0.1:5000")
SAMPLES = ROOT / "processor-templates" / "samples"
# Our own label on the containers the baselines make, so the end check and the
# clean-up only ever look at (and remove) containers of this benchmark.
BENCH_LABEL = "io.container-runner.bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def publish_samples(names: list[str], client: docker.DockerClient) -> dict[str, dict[str, Any]]:
    """Build (cached), push and pin the named samples; their allowlist entries by name."""
    entries = {}
    for name in names:
        entry = publish(SAMPLES / name, registry=REGISTRY, client=client, local_base=True)
        entries[entry["name"]] = entry
    return entries


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def proc_status(pid: int, field: str = "VmRSS") -> int:
    """A `/proc/<pid>/status` figure in KiB (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class Service:
    """A `runner api` or `runner worker` process, its log file and its pid."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path,
                 *, ready: str | None = None, url: str | None = None,
                 prefix: list[str] | None = None, timeout: float = 90) -> None:
        self.name, self.log_path, self.url = name, log_path, url
        self._out = log_path.open("wb")
        command = [*(prefix or [sys.executable]), "-m", "runner", *args]
        self.process = subprocess.Popen(command, cwd=ROOT, env=dict(env), stdout=self._out,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready(ready):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{tail}")
            time.sleep(0.1)

    def _ready(self, marker: str | None) -> bool:
        if marker is not None:
            return marker.encode() in self.log_path.read_bytes()
        if self.url is None:
            return True
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (a worker drains its current run), SIGKILL if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._out.close()


class Stack:
    """Database, Redis, manifest and key of one benchmark; processes started on demand."""

    def __init__(self, entries: list[dict[str, Any]], *, tag: str | None = None,
                 queue: str = "bench", keep: bool = False) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix=f"runner-bench-{self.tag}-"))
        self.services: list[Service] = []
        self.database = f"runner_bench_{self.tag}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        self.database_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.database}"
        try:
            upgrade(self.database_url.replace("postgresql://", "postgresql+psycopg://"))
            self.redis = RedisServer(self.dir)
            self.manifest = self.dir / "manifest.yaml"
            self.manifest.write_text(yaml.safe_dump({"version": 1, "processors": entries},
                                                    sort_keys=False))
            self.queue = f"{queue}-{self.tag}"
            self.settings = load_settings(database_url=self.database_url,
                                          redis_url=self.redis.url, manifest=self.manifest,
                                          queue=self.queue)
            self.store = Store(self.settings.database_url)
            _, self.key = Keys(self.store).create(tenant="bench", role=Role.SUBMITTER)
        except BaseException:
            self._drop_database()
            raise

    @property
    def instance(self) -> str:
        """The label value the runner puts on this stack's containers."""
        return self.settings.instance

    def env(self, **extra: object) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
        values = {"RUNNER_DATABASE_URL": self.database_url, "RUNNER_REDIS_URL": self.redis.url,
                  "RUNNER_MANIFEST": str(self.manifest), "RUNNER_QUEUE": self.queue,
                  "RUNNER_REGISTRY": REGISTRY, "RUNNER_LOG_FORMAT": "json"}
        values.update({f"RUNNER_{k.upper()}": str(v) for k, v in extra.items()})
        return {**base, **values}

    def start_api(self, name: str = "api", **settings: object) -> Service:
        port = free_port()
        service = Service(name, ["api", "--port", str(port)], self.env(**settings),
                          self.dir / f"{name}.log", url=f"http://127.0.0.1:{port}")
        self.services.append(service)
        return service

    def start_worker(self, name: str, *, queue: str | None = None,
                     prefix: list[str] | None = None, **settings: object) -> Service:
        """A `runner worker` on `queue` (the stack's by default); its metrics port is
        in `service.url` (RUNNER_WORKER_PORT)."""
        port = free_port()
        args = ["worker"] + (["--queue", queue] if queue else [])
        service = Service(name, args,
                          self.env(worker_id=f"bench-{self.tag}-{name}", worker_port=port,
                                   **settings),
                          self.dir / f"{name}.log", ready="worker_started", prefix=prefix,
                          url=f"http://127.0.0.1:{port}")
        self.services.append(service)
        return service

    def stop(self, service: Service) -> None:
        service.stop()
        if service in self.services:
            self.services.remove(service)

    def containers(self, client: docker.DockerClient) -> list[Any]:
        """Containers the runner made for this stack (by its instance label)."""
        labels = [MANAGED_LABEL, f"{INSTANCE_LABEL}={self.instance}"]
        return list(client.containers.list(all=True, sparse=True, filters={"label": labels}))

    def _drop_database(self) -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def close(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop()
        self.services.clear()
        with contextlib.suppress(Exception):
            self.store.close()
        with contextlib.suppress(Exception):
            self.redis.stop()
        self._drop_database()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def stack(entries: list[dict[str, Any]], **options: Any) -> Iterator[Stack]:
    made = Stack(entries, **options)
    try:
        yield made
    except BaseException:
        made.keep = True  # the processes' logs, to see what went wrong
        print(f"benchmark failed; logs kept in {made.dir}", file=sys.stderr)
        raise
    finally:
        made.close()


def bench_containers(client: docker.DockerClient, tag: str) -> list[Any]:
    """Containers the baselines of benchmark `tag` made and did not remove."""
    return list(client.containers.list(all=True, sparse=True,
                                       filters={"label": f"{BENCH_LABEL}={tag}"}))


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# Prometheus text parsing, enough for histograms and counters --------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match.group(2) or ""))
        with contextlib.suppress(ValueError):
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def histogram(samples: list[tuple[str, dict[str, str], float]], name: str
              ) -> tuple[list[tuple[float, float]], float, float]:
    """A histogram summed over its label sets: (cumulative buckets, sum, count)."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for metric, labels, value in samples:
        if metric == f"{name}_bucket":
            bound = float(labels.get("le", "+Inf").replace("+Inf", "inf"))
            buckets[bound] = buckets.get(bound, 0.0) + value
        elif metric == f"{name}_sum":
            total += value
        elif metric == f"{name}_count":
            count += value
    return sorted(buckets.items()), total, count


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Linear interpolation within the bucket holding quantile q (as Prometheus does)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            fraction = (rank - lower_count) / width if width > 0 else 0.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def subtract(later: list[tuple[float, float]], earlier: list[tuple[float, float]]
             ) -> list[tuple[float, float]]:
    before = dict(earlier)
    return [(bound, count - before.get(bound, 0.0)) for bound, count in later]
