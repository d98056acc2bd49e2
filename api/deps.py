"""What the API's routes need, built once per process from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from opentelemetry import trace

from runner.control.keys import Keys
from runner.control.lifecycle import Lifecycle
from runner.control.notify import EndWatcher, RunEndNotice
from runner.control.queue import RunQueue
from runner.control.ratelimit import RateLimiter
from runner.control.store import Store
from runner.manifest import ManifestSource
from runner.observability.telemetry import build_tracer_provider, tracer_of
from runner.settings import Settings


@dataclass
class Services:
    settings: Settings
    store: Store
    manifests: ManifestSource
    queue: RunQueue
    limiter: RateLimiter
    keys: Keys
    lifecycle: Lifecycle
    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    long_polls: int = 0  # GET ?wait= requests being held now (event loop only)
    ends: EndWatcher = field(init=False)  # wakes held long polls

    def __post_init__(self) -> None:
        self.ends = EndWatcher(self.settings.redis_url, self.settings.instance)

    @classmethod
    def build(cls, settings: Settings, *, tracer: trace.Tracer | None = None) -> Services:
        """`tracer` defaults to one built from the trace settings (a no-op when off)."""
        queue = RunQueue.from_url(settings.redis_url)
        if tracer is None:
            tracer = tracer_of(build_tracer_provider(settings, "api"))
        store = Store(settings.database_url)
        # Every final status written through the API (a cancel of a queued run) wakes
        # the long polls of every API process, as a worker's writes do.
        lifecycle = Lifecycle(store, listeners=[RunEndNotice(queue.redis, settings.instance)])
        return cls(settings=settings, store=store,
                   manifests=ManifestSource(settings.manifest), queue=queue,
                   limiter=RateLimiter(queue.redis), keys=Keys(store), lifecycle=lifecycle,
                   tracer=tracer)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc
