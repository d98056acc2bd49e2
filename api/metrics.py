"""Prometheus metrics of the API process, on `GET /metrics` (no key needed: it holds
no tenant data). One registry per app, so several apps in one process do not clash."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from runner.manifest import ManifestSource
from runner.models import RunRow
from runner.store import Store


class _StateCollector(Collector):
    """Read at scrape time: runs by status from the database, manifest reloads."""

    def __init__(self, store: Store, manifests: ManifestSource) -> None:
        self.store, self.manifests = store, manifests

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        runs = GaugeMetricFamily("runner_runs", "Runs by status (all tenants)",
                                 labels=["status"])
        try:
            with self.store.session() as session:
                for status, count in session.execute(
                        select(RunRow.status, func.count()).group_by(RunRow.status)):
                    runs.add_metric([status], count)
        except Exception:  # noqa: BLE001, S110 - a scrape must not fail with the database
            pass
        yield runs
        reloads = CounterMetricFamily("runner_manifest_reloads", "Manifest reloads",
                                      labels=["result"])
        reloads.add_metric(["ok"], self.manifests.reloads_ok)
        reloads.add_metric(["refused"], self.manifests.reloads_refused)
        yield reloads


class ApiMetrics:
    def __init__(self, store: Store, manifests: ManifestSource) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("runner_api_requests", "API requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("runner_api_request_seconds", "API request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.submitted = Counter("runner_runs_submitted", "Runs accepted by the API",
                                 ["processor"], registry=self.registry)
        self.registry.register(_StateCollector(store, manifests))
