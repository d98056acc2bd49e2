"""An isolated runner stack for benchmarks: its own database, Redis, manifest and processes.

Everything is named after one tag, so a benchmark never touches another user's state on
the shared servers: a PostgreSQL database `runner_bench_<tag>` on the shared server
(created and dropped here), a throwaway `redis-server` on a free loopback port, a
manifest in a temporary directory pinning the sample images by digest, and `runner api`
/ `runner worker` processes started and stopped here. The servers and processes are
the test suites' own (tests/support), so benchmarks and tests start them alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker

# The repository root, for tests.support (as bench/suite.py and bench/scale.py do).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.authoring.publish import publish
from runner.control.keys import Keys
from runner.control.store import Store
from runner.domain import Role
from runner.manifest.yamlio import dump_manifest
from runner.sandbox import INSTANCE_LABEL, MANAGED_LABEL
from runner.settings import load_settings
from tests.support.net import free_port
from tests.support.processes import RunnerProcess, start_api_process, start_worker_process
from tests.support.services import RedisServer, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("RUNNER_BENCH_PG_URL", "postgresql://runner:runner@127.0.0.1:5439/runner")
REGISTRY = os.environ.get("RUNNER_BENCH_REGISTRY", "127.0.0.1:5000")
SAMPLES = ROOT / "processor-templates" / "samples"
# Our own label on the containers the baselines make, so the end check and the
# clean-up only ever look at (and remove) containers of this benchmark.
BENCH_LABEL = "io.container-runner.bench"


def publish_samples(names: list[str], client: docker.DockerClient) -> dict[str, dict[str, Any]]:
    """Build (cached), push and pin the named samples; their allowlist entries by name."""
    entries = {}
    for name in names:
        entry = publish(SAMPLES / name, registry=REGISTRY, client=client, local_base=True)
        entries[entry["name"]] = entry
    return entries


class Stack:
    """Database, Redis, manifest and key of one benchmark; processes started on demand."""

    def __init__(self, entries: list[dict[str, Any]], *, tag: str | None = None,
                 queue: str = "bench", keep: bool = False) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix=f"runner-bench-{self.tag}-"))
        self.services: list[RunnerProcess] = []
        self.database = f"runner_bench_{self.tag}"
        self.database_url = create_database(PG_ADMIN, self.database)
        try:
            self.redis = RedisServer(self.dir)
            self.manifest = self.dir / "manifest.yaml"
            self.manifest.write_text(dump_manifest({"version": 1, "processors": entries}))
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

    def start_api(self, name: str = "api", **settings: object) -> RunnerProcess:
        service = start_api_process(self.env(**settings), self.dir / f"{name}.log", name=name)
        self.services.append(service)
        return service

    def start_worker(self, name: str, *, queue: str | None = None,
                     prefix: list[str] | None = None, **settings: object) -> RunnerProcess:
        """A `runner worker` on `queue` (the stack's by default); its metrics port is
        in `service.url` (RUNNER_WORKER_PORT)."""
        port = free_port()
        service = start_worker_process(
            self.env(worker_id=f"bench-{self.tag}-{name}", worker_port=port, **settings),
            self.dir / f"{name}.log", name=name, args=["--queue", queue] if queue else [],
            url=f"http://127.0.0.1:{port}", prefix=prefix)
        self.services.append(service)
        return service

    def stop(self, service: RunnerProcess) -> None:
        """SIGTERM (a worker drains its current run), SIGKILL if it does not exit."""
        service.stop(timeout=60)
        if service in self.services:
            self.services.remove(service)

    def containers(self, client: docker.DockerClient) -> list[Any]:
        """Containers the runner made for this stack (by its instance label)."""
        labels = [MANAGED_LABEL, f"{INSTANCE_LABEL}={self.instance}"]
        return list(client.containers.list(all=True, sparse=True, filters={"label": labels}))

    def _drop_database(self) -> None:
        drop_database(PG_ADMIN, self.database)

    def close(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop(timeout=60)
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
