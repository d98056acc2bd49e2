"""Prometheus metrics of a worker process, and collectors the API shares.

One `CollectorRegistry` per process object (never the global default registry), so
tests can build several in one interpreter. Label values are bounded: processor
names come from the manifest, statuses and error codes are enums.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runner.domain import RunStatus
from runner.manifest import ManifestSource

# Container stages are tens to hundreds of milliseconds; runs seconds to hours.
STAGE_BUCKETS = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5, 10, 30)
OVERHEAD_BUCKETS = (.0005, .001, .0025, .005, .0075, .01, .015, .025, .05, .1, .25, 1)
RUN_BUCKETS = (.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)


def webhook_counter(registry: CollectorRegistry) -> Counter:
    """Webhook delivery attempts made by this process's sender, by outcome: delivered
    (a 2xx), retry (another attempt is due later), failed (given up)."""
    return Counter("runner_webhook_deliveries", "Webhook delivery attempts by outcome "
                   "(delivered, retry, failed), sent by this process", ["outcome"],
                   registry=registry)


class ManifestCollector(Collector):
    """Manifest reloads by result, and the revision in force, read at scrape time."""

    def __init__(self, manifests: ManifestSource) -> None:
        self.manifests = manifests

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        reloads = CounterMetricFamily("runner_manifest_reloads",
                                      "Manifest reloads (refused: an invalid edit was kept out)",
                                      labels=["result"])
        reloads.add_metric(["ok"], self.manifests.reloads_ok)
        reloads.add_metric(["refused"], self.manifests.reloads_refused)
        yield reloads
        info = GaugeMetricFamily("runner_manifest_info", "The manifest revision in force",
                                 labels=["revision"])
        with contextlib.suppress(Exception):  # no manifest loaded: no sample
            info.add_metric([self.manifests.current().revision[:19]], 1)
        yield info


class QueueDepthCollector(Collector):
    """Jobs waiting in each queue (its tenants' lanes and its RQ list), read at scrape
    time."""

    def __init__(self, depths: Callable[[list[str]], Mapping[str, int]],
                 queues: Callable[[], list[str]]) -> None:
        self.depths, self.queues = depths, queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("runner_queue_depth", "Jobs waiting in the queue",
                                  labels=["queue"])
        up = GaugeMetricFamily("runner_redis_up", "1 when Redis answered this scrape")
        try:
            names = sorted(set(self.queues()))
            for name, count in self.depths(names).items():
                depth.add_metric([name], count)
            up.add_metric([], 1)
        except Exception:  # noqa: BLE001 - Redis (or the manifest) unusable: report it down
            up.add_metric([], 0)
        yield depth
        yield up


@dataclass
class WorkerStats:
    """What `/healthz` reports about this worker's work so far."""

    started_at: float = field(default_factory=time.time)
    last_run_at: datetime | None = None
    current_run: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, run_id: str) -> None:
        with self._lock:
            self.current_run = run_id

    def leave(self, run_id: str) -> None:
        """The worker is done with the run, however it ended (even fenced off)."""
        with self._lock:
            if self.current_run == run_id:
                self.current_run = None

    def end(self, status: str, at: datetime) -> None:
        with self._lock:
            self.current_run = None
            self.last_run_at = at
            self.counts[status] = self.counts.get(status, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"started_at": self.started_at, "current_run": self.current_run,
                    "last_run_at": self.last_run_at.isoformat() if self.last_run_at else None,
                    "runs": dict(self.counts)}


class WorkerMetrics:
    """Everything one worker process counts; served on its own port."""

    def __init__(self, manifests: ManifestSource | None = None, *,
                 depths: Callable[[list[str]], Mapping[str, int]] | None = None,
                 queues: list[str] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter("runner_runs_finished", "Runs that reached a terminal status",
                                ["processor", "status"], registry=r)
        self.duration = Histogram("runner_run_duration_seconds",
                                  "Container run time of finished attempts",
                                  ["processor", "status"], buckets=RUN_BUCKETS, registry=r)
        self.queue_wait = Histogram("runner_queue_wait_seconds",
                                    "From queued (or due for retry) to claimed",
                                    ["processor"], buckets=RUN_BUCKETS, registry=r)
        self.pull = Histogram("runner_image_pull_seconds",
                              "Making the pinned image local (0 when it already was)",
                              buckets=STAGE_BUCKETS, registry=r)
        self.create = Histogram("runner_container_create_seconds",
                                "Docker create call", buckets=STAGE_BUCKETS, registry=r)
        self.start = Histogram("runner_container_start_seconds",
                               "Input delivery and the Docker start call",
                               buckets=STAGE_BUCKETS, registry=r)
        self.remove = Histogram("runner_container_remove_seconds", "Docker remove call",
                                buckets=STAGE_BUCKETS, registry=r)
        self.dequeue_to_create = Histogram(
            "runner_dequeue_to_create_seconds",
            "Queue overhead: job handed to the worker until the Docker create call",
            buckets=OVERHEAD_BUCKETS, registry=r)
        self.retries = Counter("runner_retries", "Attempts that failed and were retried",
                               ["processor", "error_code"], registry=r)
        self.dead_letters = Counter("runner_dead_letters", "Runs that ended as dead letters",
                                    ["processor", "error_code"], registry=r)
        self.running = Gauge("runner_runs_running", "Runs this worker is executing",
                             registry=r)
        self.reconciler = Counter("runner_reconciler_actions",
                                  "What the reconciler did (expired leases, requeued runs, "
                                  "removed containers)", ["action"], registry=r)
        self.log_dropped = Counter("runner_log_bytes_dropped",
                                   "Processor output over the log cap, not stored",
                                   ["processor"], registry=r)
        self.webhooks = webhook_counter(r)
        self.stats = WorkerStats()
        if manifests is not None:
            r.register(ManifestCollector(manifests))
        if depths is not None:
            names = list(queues or [])
            r.register(QueueDepthCollector(depths, lambda: names))

    def record_finish(self, processor: str, status: RunStatus, *, error_code: str | None,
                      seconds: float | None) -> None:
        """An attempt's end as recorded: a retry, or the run's terminal status."""
        code = error_code or "none"
        if status is RunStatus.QUEUED:
            self.retries.labels(processor, code).inc()
        else:
            self.finished.labels(processor, status.value).inc()
            if status is RunStatus.DEAD_LETTER:
                self.dead_letters.labels(processor, code).inc()
            if seconds is not None:
                self.duration.labels(processor, status.value).observe(seconds)
        self.stats.end("retried" if status is RunStatus.QUEUED else status.value,
                       datetime.now(UTC))

    def webhook_outcome(self, outcome: str) -> None:
        """One attempt of this process's webhook sender (`WebhookSender.start`)."""
        self.webhooks.labels(outcome).inc()

    def observe_stage(self, name: str, seconds: float) -> None:
        histogram = {"pull": self.pull, "create": self.create, "start": self.start,
                     "remove": self.remove}.get(name)
        if histogram is not None:
            histogram.observe(seconds)
