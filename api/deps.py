"""What the API's routes need, built once per process from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from runner.limits import RateLimiter
from runner.manifest import ManifestSource
from runner.queue import RunQueue
from runner.settings import Settings
from runner.store import Store


@dataclass
class Services:
    settings: Settings
    store: Store
    manifests: ManifestSource
    queue: RunQueue
    limiter: RateLimiter

    @classmethod
    def build(cls, settings: Settings) -> Services:
        queue = RunQueue.from_url(settings.redis_url)
        return cls(settings=settings, store=Store(settings.database_url),
                   manifests=ManifestSource(settings.manifest), queue=queue,
                   limiter=RateLimiter(queue.redis))


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc
