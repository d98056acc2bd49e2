"""`runner worker`: RQ workers whose jobs are (run id, attempt) pairs.

Why `SimpleWorker`: RQ's default worker forks a "work horse" per job to isolate job
code from the worker. Here the job's code is ours and the processor already runs in
its own container, so a fork per job would only add latency and break connection
reuse (database pool, Docker and Redis clients). `SimpleWorker` runs the job in the
worker process; the container is the isolation. The RQ job timeout is set well past
the container deadline, so the runner's own timeout always fires first.

`--concurrency N` runs N such processes under `supervisor`, which forwards signals
and restarts a process that dies. The process's services (one store, queue,
manifest source, ledger and sandbox) come from `wiring`; besides the job, a process
runs a reconciler thread and, with webhooks configured, a webhook sender thread
(`runner.control.delivery`). Shutdown: the first SIGTERM lets the
current run finish for up to the drain timeout; past it, or on a second signal, the
container is stopped and the run handed back to be retried elsewhere as worker_lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from http.server import ThreadingHTTPServer
from types import FrameType
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import RedisError
from rq.worker import SimpleWorker

from runner.control.lanes import LaneQueue, TenantTurns
from runner.control.migrate import require_current_schema
from runner.control.queue import host_queues
from runner.errors import RunnerError, ServiceUnavailableError
from runner.execution.executor import Executor
from runner.execution.health import WorkerHealth, serve
from runner.execution.ports import FaultHook, no_fault
from runner.execution.reconciler import FAST_PASS_DUE, Reconciler, Report
from runner.execution.wiring import WorkerServices, sandbox_config
from runner.observability.logsetup import bind_process
from runner.observability.metrics import WorkerMetrics
from runner.observability.telemetry import build_tracer_provider, tracer_of
from runner.sandbox import Sandbox
from runner.settings import Settings

log = structlog.get_logger(__name__)

# The executor of the worker running in this thread; set once by `run_worker`.
current_executor: ContextVar[Executor] = ContextVar("current_executor")
# When RQ handed the current job over (time.monotonic), set by `RunnerWorker`.
dequeued_at: ContextVar[float | None] = ContextVar("dequeued_at", default=None)


def perform(run_id: str, attempt: int) -> str | None:
    """The RQ job: execute one attempt of `run_id` (takes an id, never an object)."""
    status = current_executor.get().execute(run_id, attempt, dequeued_at=dequeued_at.get())
    return status.value if status is not None else None


class RunnerWorker(SimpleWorker):
    """SimpleWorker whose warm shutdown turns cold after the drain timeout."""

    drain_timeout_seconds: float = 60.0

    def dequeue_job_and_maintain_ttl(self, *args: Any, **kwargs: Any) -> Any:
        result = super().dequeue_job_and_maintain_ttl(*args, **kwargs)
        dequeued_at.set(time.monotonic())
        return result

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]  # idle: raises
        log.info("worker_draining", timeout_s=self.drain_timeout_seconds)
        timer = threading.Timer(max(self.drain_timeout_seconds, 1.1),
                                os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
        self.drain_timer = timer

    drain_timer: threading.Timer | None = None


REQUEUE_SECONDS = 0.5


def _count(metrics: WorkerMetrics, report: Report) -> None:
    for action in ("expired", "requeued", "removed_containers"):
        count = len(getattr(report, action))
        if count:
            metrics.reconciler.labels(action).inc(count)
    if report.pruned:
        metrics.reconciler.labels("pruned").inc(report.pruned)


def _reconcile_forever(reconciler: Reconciler, interval: float, stop: threading.Event,
                       metrics: WorkerMetrics) -> None:
    """Enqueue due retries every half second; a full reconcile pass every `interval`."""
    next_pass = time.monotonic() + interval
    while not stop.wait(min(REQUEUE_SECONDS, interval)):
        try:  # the loop must outlive a bad pass
            if time.monotonic() >= next_pass:
                next_pass = time.monotonic() + interval
                _count(metrics, reconciler.run_once())
            else:
                requeued = reconciler.requeue_due(limit=FAST_PASS_DUE, exclusive=True)
                if requeued:
                    metrics.reconciler.labels("requeued").inc(len(requeued))
        except Exception:
            log.exception("reconcile_failed")


PREFETCH_SECONDS = 2.0


def _prefetch_forever(services: WorkerServices) -> None:
    """Pull every allowlisted image at start and after each manifest change, so a run
    never waits for a pull (a failed pull is retried on the next change, and the run
    itself reports it if it comes first)."""
    seen = ""
    while True:
        try:
            manifest = services.manifests.current()
            if manifest.revision != seen:
                seen = manifest.revision
                images = sorted({p.image for p in manifest.processors})
                started = time.monotonic()
                problems = services.sandbox.prefetch(images) if services.sandbox else {}
                log.info("images_prefetched", images=len(images), failed=len(problems),
                         revision=seen[:19],
                         duration_ms=round((time.monotonic() - started) * 1000, 1))
        except Exception:
            log.exception("prefetch_failed")
        time.sleep(PREFETCH_SECONDS)


def _readiness(settings: Settings, services: WorkerServices) -> dict[str, Callable[[], object]]:
    """The worker's readiness checks, each with a short timeout of its own."""
    probe = Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)

    def redis_ok() -> None:
        try:
            probe.ping()
        except RedisError as exc:
            raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc

    # Not the executor's client: its long timeout (pulls) would let a hung engine pile
    # up probe threads.
    docker_probe = Sandbox.from_env(sandbox_config(settings), timeout=3)
    return {"docker": docker_probe.ping, "redis": redis_ok,
            "database": services.ledger.ping, "manifest": services.manifests.current}


def fair_queues(settings: Settings, redis: Redis, names: list[str]) -> list[LaneQueue]:
    """The queues a worker serves, in order, its tenants taking turns within each
    (runner/control/lanes.py; a tenant's weight is its runs per turn)."""
    turns = TenantTurns(settings.tenant_weight_map)
    return [LaneQueue(name, connection=redis, turns=turns) for name in names]


def run_worker(settings: Settings, *, queues: list[str] | None = None,
               burst: bool = False, fault: FaultHook | None = None) -> None:
    """Serve jobs from `queues` (in priority order) until stopped.

    `fault` is for tests only (tests/support/faulty_worker.py): a hook called at named
    points of each attempt.
    """
    # Each queue, with every subset of this host's tags (routing by capability).
    names = host_queues(queues or [settings.queue], settings.host_tag_list)
    bind_process(worker_id=settings.worker_id)
    require_current_schema(settings.database_url)
    services = WorkerServices.build(settings)
    assert services.sandbox is not None
    sandbox, queue = services.sandbox, services.queue
    metrics = WorkerMetrics(services.manifests, depths=queue.depths, queues=names)
    provider = build_tracer_provider(settings, "worker")
    executor = services.executor(tracer=tracer_of(provider), metrics=metrics,
                                 fault=fault or no_fault)
    sandbox.ping()
    sandbox.check_engine()
    services.ledger.ping()
    queue.ping()
    threading.Thread(target=_prefetch_forever, daemon=True, name="prefetch",
                     args=(services,)).start()
    server = _serve_health(settings, metrics, services)
    reconciler = services.reconciler()
    _count(metrics, reconciler.run_once())
    stop = threading.Event()
    threading.Thread(target=_reconcile_forever, daemon=True, name="reconciler",
                     args=(reconciler, settings.reconcile_interval_seconds, stop,
                           metrics)).start()
    if services.webhooks is not None:  # its own thread: a receiver never delays a run
        services.webhooks.start(observe=metrics.webhook_outcome)
    current_executor.set(executor)
    worker = RunnerWorker(fair_queues(settings, queue.redis, names), connection=queue.redis,
                          name=f"{settings.worker_id}-{os.getpid()}", queue_class=LaneQueue)
    worker.drain_timeout_seconds = settings.drain_timeout_seconds
    log.info("worker_started", queues=names, host_id=settings.host_id,
             host_tags=settings.host_tag_list, tenant_weights=settings.tenant_weight_map,
             manifest=str(settings.manifest),
             revision=services.manifests.current().revision)
    try:
        # No RQ scheduler: it forks a child that would inherit (and, if this process
        # is killed, keep open) our database connections; due retries are requeued by
        # the loop above instead.
        worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
    finally:
        if worker.drain_timer is not None:  # drained in time: no forced stop mid-exit
            worker.drain_timer.cancel()
        stop.set()
        if services.webhooks is not None:
            services.webhooks.stop()
        if not sandbox.drain(timeout=30):
            log.warning("containers_left_for_the_reconciler")
        if server is not None:
            server.shutdown()
        if provider is not None:
            provider.shutdown()  # flush spans still in the exporter's batch
        executor.close()
        services.close()
        log.info("worker_stopped")


def _serve_health(settings: Settings, metrics: WorkerMetrics,
                  services: WorkerServices) -> ThreadingHTTPServer | None:
    """The worker's /metrics, /healthz and /readyz (RUNNER_WORKER_PORT; 0 = none)."""
    if not settings.worker_port:
        return None
    health = WorkerHealth(settings.worker_id, metrics, _readiness(settings, services))
    try:
        return serve(health, host=settings.worker_host, port=settings.worker_port)
    except OSError as exc:
        raise RunnerError(f"cannot serve metrics and health on {settings.worker_host}:"
                          f"{settings.worker_port} (RUNNER_WORKER_PORT): "
                          f"{exc.strerror}") from exc
