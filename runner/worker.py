"""`runner worker`: an RQ worker whose jobs are run ids.

Why `SimpleWorker`: RQ's default worker forks a "work horse" per job to isolate job
code from the worker. Here the job's code is ours and the processor already runs in
its own container, so a fork per job would only add latency and break connection
reuse (database pool, Docker and Redis clients). `SimpleWorker` runs the job in the
worker process; the container is the isolation. The RQ job timeout is set well past
the container deadline, so the runner's own timeout always fires first.
"""

from __future__ import annotations

from contextvars import ContextVar

import structlog
from rq import Queue
from rq.worker import SimpleWorker

from runner.executor import Executor
from runner.manifest import ManifestSource
from runner.queue import RunQueue
from runner.sandbox import Sandbox, SandboxConfig
from runner.settings import Settings
from runner.store import Store

log = structlog.get_logger(__name__)

# The executor of the worker running in this thread; set once by `run_worker`.
current_executor: ContextVar[Executor] = ContextVar("current_executor")


def perform(run_id: str) -> str | None:
    """The RQ job: execute one attempt of `run_id` (takes an id, never an object)."""
    status = current_executor.get().execute(run_id)
    return status.value if status is not None else None


def sandbox_config(settings: Settings) -> SandboxConfig:
    return SandboxConfig(user=settings.container_user, tmp_size_bytes=settings.tmp_size,
                         stop_grace_seconds=settings.stop_grace_seconds,
                         result_max_bytes=settings.result_max_bytes,
                         pull_timeout_seconds=settings.pull_timeout_seconds)


def build_executor(settings: Settings) -> Executor:
    return Executor(store=Store(settings.database_url),
                    manifests=ManifestSource(settings.manifest),
                    sandbox=Sandbox.from_env(sandbox_config(settings),
                                             timeout=settings.pull_timeout_seconds),
                    worker_id=settings.worker_id,
                    stop_grace_seconds=settings.stop_grace_seconds)


def run_worker(settings: Settings, *, queues: list[str] | None = None,
               burst: bool = False) -> None:
    """Serve jobs from `queues` (in priority order) until stopped."""
    executor = build_executor(settings)
    executor.sandbox.ping()
    executor.store.ping()
    transport = RunQueue.from_url(settings.redis_url)
    transport.ping()
    names = queues or [settings.queue]
    current_executor.set(executor)
    worker = SimpleWorker([Queue(n, connection=transport.redis) for n in names],
                          connection=transport.redis, name=settings.worker_id)
    structlog.contextvars.bind_contextvars(worker_id=settings.worker_id)
    log.info("worker_started", queues=names, manifest=str(settings.manifest),
             revision=executor.manifests.current().revision)
    try:
        worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
    finally:
        executor.store.close()
        log.info("worker_stopped")
