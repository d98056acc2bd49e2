"""Prometheus metrics of the API process, on `GET /metrics` (no key needed: it holds
no tenant data). One registry per app, so several apps in one process do not clash."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis

from runner.control.queue import served_queues, unserved
from runner.control.store import Store
from runner.observability.metrics import (
    ManifestCollector,
    QueueDepthCollector,
    webhook_counter,
)

if TYPE_CHECKING:
    from api.deps import Services


class RunsCollector(Collector):
    """Runs by status, from the database (the fleet-wide view), at most once every
    `ttl` seconds: `/metrics` needs no key, so a scraper (or anyone) calling it in a
    loop must not make the database count every run each time."""

    def __init__(self, store: Store, ttl: float = 15.0) -> None:
        self.store, self.ttl = store, ttl
        self._counts: dict[str, int] = {}
        self._up = 0
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def _current(self) -> tuple[dict[str, int], int]:
        with self._lock:  # one count at a time; concurrent scrapes share it
            if time.monotonic() - self._read_at >= self.ttl:
                try:
                    self._counts, self._up = self.store.count_runs_by_status(), 1
                except Exception:  # noqa: BLE001 - a scrape must not fail with the database
                    self._up = 0
                self._read_at = time.monotonic()
            return self._counts, self._up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runs = GaugeMetricFamily("runner_runs", f"Runs by status (all tenants), "
                                 f"counted at most every {self.ttl:g}s", labels=["status"])
        up = GaugeMetricFamily("runner_database_up", "1 when the database answered its "
                               "last count")
        counts, answered = self._current()
        for status, count in counts.items():
            runs.add_metric([status], count)
        up.add_metric([], answered)
        yield runs
        yield up


class UnservedCollector(Collector):
    """Queued runs on a queue no live worker serves (a tag no host has, or every host
    that has it down), per queue, read at most every `ttl` seconds like RunsCollector:
    such runs wait, visibly, rather than sit in a backlog that looks like load."""

    def __init__(self, store: Store, redis: Redis, ttl: float = 15.0) -> None:
        self.store, self.redis, self.ttl = store, redis, ttl
        self._found: dict[str, int] = {}
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def _current(self) -> dict[str, int]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                try:
                    self._found = unserved(self.store.queued_by_queue(),
                                           served_queues(self.redis))
                except Exception:  # noqa: BLE001 - a scrape must not fail with a backend
                    self._found = {}
                self._read_at = time.monotonic()
            return self._found

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "runner_runs_unserved", "Queued runs on a queue that no live worker serves "
            "(their processor requires host tags no live host has)", labels=["queue"])
        for queue, count in sorted(self._current().items()):
            family.add_metric([queue], count)
        yield family


class ApiMetrics:
    def __init__(self, services: Services) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("runner_api_requests", "API requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("runner_api_request_seconds", "API request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.submitted = Counter("runner_runs_submitted", "Runs accepted by the API",
                                 ["processor"], registry=self.registry)
        self.reused = Counter("runner_runs_reused", "Submissions answered by an earlier "
                              "succeeded run (reuse), no container started",
                              ["processor"], registry=self.registry)
        self.uploaded_bytes = Counter("runner_file_upload_bytes", "Bytes of files uploaded",
                                      registry=self.registry)
        self.uploads = Counter("runner_file_uploads", "File uploads by outcome",
                               ["outcome"], registry=self.registry)
        self.webhooks = webhook_counter(self.registry)
        manifests = services.manifests

        def queues() -> list[str]:
            names = {services.settings.queue}
            names.update(p.queue for p in manifests.current().processors if p.queue)
            return sorted(names)

        self.registry.register(RunsCollector(services.store))
        self.registry.register(UnservedCollector(services.store, services.queue.redis))
        self.registry.register(ManifestCollector(manifests))
        self.registry.register(QueueDepthCollector(services.queue.depths, queues))

    def webhook_outcome(self, outcome: str) -> None:
        """One attempt of this process's webhook sender (`WebhookSender.start`)."""
        self.webhooks.labels(outcome).inc()
