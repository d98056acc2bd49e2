"""What the API's routes need, built once per process from the settings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from opentelemetry import trace

from runner.control.delivery import WebhookSender
from runner.control.files import FileCatalog, RunFiles, catalog_for, run_files
from runner.control.keys import Keys
from runner.control.lifecycle import Lifecycle
from runner.control.notify import EndWatcher, RunEndNotice
from runner.control.queue import RunQueue
from runner.control.ratelimit import Limit, RateLimiter
from runner.control.store import Store, is_run_id
from runner.control.webhooks import WebhookRules
from runner.domain import Run
from runner.errors import NotFoundError, RateLimitedError, ServiceUnavailableError
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
    files: FileCatalog
    run_files: RunFiles
    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    # What a submission's webhook_url is checked against, and this process's sender
    # (started and stopped with the app, `api.app`); None without webhook settings.
    webhook_rules: WebhookRules = field(default_factory=WebhookRules)
    webhooks: WebhookSender | None = None
    long_polls: int = 0  # GET ?wait= requests being held now (event loop only)
    # Log follows streaming now, per key (event loop only): `hold_follow`.
    follows: Counter[str] = field(default_factory=Counter)
    ends: EndWatcher = field(init=False)  # wakes held long polls

    def __post_init__(self) -> None:
        self.ends = EndWatcher(self.settings.redis_url, self.settings.instance)

    FOLLOW_RETRY_SECONDS = 5

    def submission_limit(self, tenant: str) -> Limit:
        """The tenant's submissions per minute: one counter for the API's single POSTs
        (counted with the key, `api.auth`), its batches' items, replays and the
        dashboard's submissions."""
        return Limit(f"tenant-submissions:{tenant}",
                     self.settings.tenant_submissions_per_minute, 60,
                     f"submissions for tenant {tenant}")

    def count_submission(self, tenant: str) -> None:
        """Raises: RateLimitedError past the tenant's submissions per minute."""
        limit = self.submission_limit(tenant)
        self.limiter.hit(limit.name, limit=limit.limit, window_seconds=limit.window_seconds,
                         what=limit.what)

    def admit_submissions(self, tenant: str, count: int) -> int:
        """How many of `count` submissions (a batch's items) the tenant's submissions
        per minute still allow now; those are counted, the rest are not."""
        limit = self.submission_limit(tenant)
        return self.limiter.take(limit.name, count, limit=limit.limit,
                                 window_seconds=limit.window_seconds)

    def submit_options(self) -> dict[str, Any]:
        """The settings and rules every new run (submitted or replayed, by the API or
        the dashboard) is made under."""
        return {"default_queue": self.settings.queue,
                "stop_grace_seconds": self.settings.stop_grace_seconds,
                "input_max_bytes": self.settings.input_max_bytes,
                "max_active": self.settings.tenant_max_active_runs,
                "file_rules": self.run_files, "webhook_rules": self.webhook_rules}

    def hold_follow(self, key_id: str) -> None:
        """Take one of the follow streams a key, and this process, may hold at once.
        Called on the event loop, like `release_follow`, so the counts need no lock.

        Raises:
            RateLimitedError: the key already holds RUNNER_FOLLOW_MAX_PER_KEY (429).
            ServiceUnavailableError: the process holds RUNNER_FOLLOW_MAX_PER_PROCESS (503).
        """
        per_key, per_process = (self.settings.follow_max_per_key,
                                self.settings.follow_max_per_process)
        if self.follows[key_id] >= per_key:
            raise RateLimitedError(
                f"this API key already follows {per_key} log streams at once; close one "
                f"or retry after {self.FOLLOW_RETRY_SECONDS}s",
                retry_after=self.FOLLOW_RETRY_SECONDS)
        if self.follows.total() >= per_process:
            raise ServiceUnavailableError(
                f"this API process already serves {per_process} log follows; retry after "
                f"{self.FOLLOW_RETRY_SECONDS}s", retry_after=self.FOLLOW_RETRY_SECONDS)
        self.follows[key_id] += 1

    def release_follow(self, key_id: str) -> None:
        self.follows[key_id] -= 1
        if self.follows[key_id] <= 0:
            del self.follows[key_id]

    @classmethod
    def build(cls, settings: Settings, *, tracer: trace.Tracer | None = None) -> Services:
        """`tracer` defaults to one built from the trace settings (a no-op when off)."""
        queue = RunQueue.from_url(settings.redis_url, fair=settings.fair_dequeue == "on")
        if tracer is None:
            tracer = tracer_of(build_tracer_provider(settings, "api"))
        store = Store(settings.database_url, pool_size=settings.api_database_pool_size,
                      max_overflow=settings.api_database_max_overflow,
                      pool_timeout=settings.api_database_pool_timeout_seconds)
        # Every final status written through the API (a cancel of a queued run) wakes
        # the long polls of every API process, as a worker's writes do.
        lifecycle = Lifecycle(store, listeners=[RunEndNotice(queue.redis, settings.instance)])
        webhooks = WebhookSender.from_settings(store, settings)
        if webhooks is not None:  # a cancel here is sent at once, not at the next poll
            lifecycle.listeners.append(webhooks.wake)
        files = catalog_for(settings, store)
        return cls(settings=settings, store=store,
                   manifests=ManifestSource(settings.manifest), queue=queue,
                   limiter=RateLimiter(queue.redis), keys=Keys(store), lifecycle=lifecycle,
                   files=files, run_files=run_files(files, settings), tracer=tracer,
                   webhook_rules=WebhookRules.from_settings(settings), webhooks=webhooks)


async def services(request: Request) -> Services:
    """The process's services (async: a plain `def` dependency costs a thread hop)."""
    svc: Services = request.app.state.services
    return svc


def run_or_404(svc: Services, run_id: str, tenant: str) -> Run:
    """The caller's tenant's run.

    Raises:
        NotFoundError: no such run for this tenant, or not even shaped like a run id.
    """
    if not is_run_id(run_id):  # not even shaped like an id: the database is not asked
        raise NotFoundError("no such run: not a run id")
    run = svc.store.get_run(run_id, tenant=tenant)
    if run is None:
        raise NotFoundError(f"no run {run_id}")
    return run
