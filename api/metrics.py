"""Prometheus metrics of the API process, on `GET /metrics` (no key needed: it holds
no tenant data). One registry per app, so several apps in one process do not clash."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from runner.control.store import Store
from runner.observability.metrics import ManifestCollector, QueueDepthCollector

if TYPE_CHECKING:
    from api.deps import Services


class _RunsCollector(Collector):
    """Runs by status, from the database at scrape time (the fleet-wide view)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runs = GaugeMetricFamily("runner_runs", "Runs by status (all tenants)",
                                 labels=["status"])
        up = GaugeMetricFamily("runner_database_up", "1 when the database answered this scrape")
        try:
            for status, count in self.store.count_runs_by_status().items():
                runs.add_metric([status], count)
            up.add_metric([], 1)
        except Exception:  # noqa: BLE001 - a scrape must not fail with the database
            up.add_metric([], 0)
        yield runs
        yield up


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
        manifests = services.manifests

        def queues() -> list[str]:
            names = {services.settings.queue}
            names.update(p.queue for p in manifests.current().processors if p.queue)
            return sorted(names)

        self.registry.register(_RunsCollector(services.store))
        self.registry.register(ManifestCollector(manifests))
        self.registry.register(QueueDepthCollector(services.queue.redis, queues))
