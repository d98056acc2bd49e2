"""`runner worker`: RQ workers whose jobs are (run id, attempt) pairs.

Why `SimpleWorker`: RQ's default worker forks a "work horse" per job to isolate job
code from the worker. Here the job's code is ours and the processor already runs in
its own container, so a fork per job would only add latency and break connection
reuse (database pool, Docker and Redis clients). `SimpleWorker` runs the job in the
worker process; the container is the isolation. The RQ job timeout is set well past
the container deadline, so the runner's own timeout always fires first.

`--concurrency N` runs N such processes under a small supervisor that forwards
signals and restarts a process that dies. Shutdown: the first SIGTERM lets the
current run finish for up to the drain timeout; past it, or on a second signal, the
container is stopped and the run handed back to be retried elsewhere as worker_lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import replace
from types import FrameType
from typing import Any

import structlog
from opentelemetry import trace
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.worker import SimpleWorker

from runner.control.lifecycle import Lifecycle
from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.errors import RunnerError, ServiceUnavailableError
from runner.execution.executor import Executor
from runner.execution.faults import Faults
from runner.execution.health import WorkerHealth, serve
from runner.execution.reconciler import Reconciler, Report
from runner.manifest import ManifestSource
from runner.observability.logsetup import bind_process
from runner.observability.metrics import WorkerMetrics
from runner.observability.telemetry import build_tracer_provider, tracer_of
from runner.sandbox import Sandbox, SandboxConfig
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


def sandbox_config(settings: Settings) -> SandboxConfig:
    return SandboxConfig(user=settings.container_user, tmp_size_bytes=settings.tmp_size,
                         stop_grace_seconds=settings.stop_grace_seconds,
                         result_max_bytes=settings.result_max_bytes,
                         instance=settings.instance,
                         direct_volume_io=settings.direct_volume_io)


def build_reconciler(settings: Settings, *, store: Store | None = None,
                     with_docker: bool = True) -> Reconciler:
    store = store or Store(settings.database_url)
    sandbox = None
    if with_docker:
        sandbox = Sandbox.from_env(sandbox_config(settings))
    return Reconciler(store=store, lifecycle=Lifecycle(store),
                      queue=RunQueue.from_url(settings.redis_url), sandbox=sandbox,
                      manifests=ManifestSource(settings.manifest),
                      grace_seconds=settings.reconcile_grace_seconds,
                      stop_grace_seconds=settings.stop_grace_seconds,
                      lock_seconds=max(2.0, 2 * settings.reconcile_interval_seconds))


def build_executor(settings: Settings, *, tracer: trace.Tracer | None = None,
                   metrics: WorkerMetrics | None = None) -> Executor:
    store = Store(settings.database_url)
    return Executor(store=store, lifecycle=Lifecycle(store),
                    manifests=ManifestSource(settings.manifest),
                    tracer=tracer or trace.NoOpTracer(), metrics=metrics,
                    instance=settings.instance,
                    sandbox=Sandbox.from_env(replace(sandbox_config(settings),
                                                     remove_in_background=True),
                                             timeout=settings.pull_timeout_seconds),
                    queue=RunQueue.from_url(settings.redis_url),
                    worker_id=settings.worker_id,
                    lease_seconds=settings.lease_seconds,
                    heartbeat_seconds=settings.heartbeat_seconds,
                    stop_grace_seconds=settings.stop_grace_seconds,
                    faults=Faults(frozenset(p for p in settings.fault_points.split(",") if p)))


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
RESTART_RESET_SECONDS = 60.0  # a worker up this long is healthy again: delay resets
RESTART_MAX_SECONDS = 30.0


def _count(metrics: WorkerMetrics, report: Report) -> None:
    for action in ("expired", "requeued", "removed_containers"):
        count = len(getattr(report, action))
        if count:
            metrics.reconciler.labels(action).inc(count)


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
                requeued = reconciler.requeue_due()
                if requeued:
                    metrics.reconciler.labels("requeued").inc(len(requeued))
        except Exception:
            log.exception("reconcile_failed")


PREFETCH_SECONDS = 2.0


def _prefetch_forever(executor: Executor) -> None:
    """Pull every allowlisted image at start and after each manifest change, so a run
    never waits for a pull (a failed pull is retried on the next change, and the run
    itself reports it if it comes first)."""
    seen = ""
    while True:
        try:
            manifest = executor.manifests.current()
            if manifest.revision != seen:
                seen = manifest.revision
                images = sorted({p.image for p in manifest.processors})
                started = time.monotonic()
                problems = executor.sandbox.prefetch(images)
                log.info("images_prefetched", images=len(images), failed=len(problems),
                         revision=seen[:19],
                         duration_ms=round((time.monotonic() - started) * 1000, 1))
        except Exception:
            log.exception("prefetch_failed")
        time.sleep(PREFETCH_SECONDS)


def _readiness(settings: Settings, executor: Executor) -> dict[str, Callable[[], object]]:
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
            "database": executor.store.ping, "manifest": executor.manifests.current}


def run_worker(settings: Settings, *, queues: list[str] | None = None,
               burst: bool = False) -> None:
    """Serve jobs from `queues` (in priority order) until stopped."""
    names = queues or [settings.queue]
    bind_process(worker_id=settings.worker_id)
    manifests = ManifestSource(settings.manifest)
    queue = RunQueue.from_url(settings.redis_url)
    metrics = WorkerMetrics(manifests, redis=queue.redis, queues=names)
    provider = build_tracer_provider(settings, "worker")
    executor = build_executor(settings, tracer=tracer_of(provider), metrics=metrics)
    executor.manifests = manifests
    executor.sandbox.ping()
    executor.sandbox.check_engine()
    executor.store.ping()
    executor.queue.ping()
    threading.Thread(target=_prefetch_forever, daemon=True, name="prefetch",
                     args=(executor,)).start()
    server = None
    if settings.worker_port:
        health = WorkerHealth(settings.worker_id, metrics, _readiness(settings, executor))
        try:
            server = serve(health, host=settings.worker_host, port=settings.worker_port)
        except OSError as exc:
            raise RunnerError(f"cannot serve metrics and health on {settings.worker_host}:"
                              f"{settings.worker_port} (RUNNER_WORKER_PORT): "
                              f"{exc.strerror}") from exc
    reconciler = build_reconciler(settings)
    _count(metrics, reconciler.run_once())
    stop = threading.Event()
    threading.Thread(target=_reconcile_forever, daemon=True, name="reconciler",
                     args=(reconciler, settings.reconcile_interval_seconds, stop,
                           metrics)).start()
    current_executor.set(executor)
    redis = executor.queue.redis
    worker = RunnerWorker([Queue(n, connection=redis) for n in names], connection=redis,
                          name=f"{settings.worker_id}-{os.getpid()}")
    worker.drain_timeout_seconds = settings.drain_timeout_seconds
    log.info("worker_started", queues=names, manifest=str(settings.manifest),
             revision=executor.manifests.current().revision)
    try:
        # No RQ scheduler: it forks a child that would inherit (and, if this process
        # is killed, keep open) our database connections; due retries are requeued by
        # the loop above instead.
        worker.work(burst=burst, logging_level="WARNING", with_scheduler=False)
    finally:
        if worker.drain_timer is not None:  # drained in time: no forced stop mid-exit
            worker.drain_timer.cancel()
        stop.set()
        if not executor.sandbox.drain(timeout=30):
            log.warning("containers_left_for_the_reconciler")
        if server is not None:
            server.shutdown()
        if provider is not None:
            provider.shutdown()  # flush spans still in the exporter's batch
        executor.store.close()
        log.info("worker_stopped")


def supervise(settings: Settings, *, concurrency: int, queues: list[str] | None) -> None:
    """Run `concurrency` worker processes; forward signals; restart one that dies."""
    args = [sys.executable, "-m", "runner", "worker"]
    for name in queues or []:
        args += ["--queue", name]
    children: dict[int, subprocess.Popen[Any]] = {}
    stopping = threading.Event()

    def spawn(index: int) -> None:
        env = {**os.environ, "RUNNER_WORKER_ID": f"{settings.worker_id}-{index}"}
        if settings.worker_port:  # each process its own metrics/health port
            env["RUNNER_WORKER_PORT"] = str(settings.worker_port + index - 1)
        children[index] = subprocess.Popen(args, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started_at: dict[int, float] = {}
    failures: dict[int, int] = {}
    restart_at: dict[int, float] = {}
    for index in range(1, concurrency + 1):
        spawn(index)
        started_at[index] = time.monotonic()
    log.info("supervisor_started", workers=concurrency)
    while True:
        alive = [c for c in children.values() if c.poll() is None]
        if stopping.is_set() and not alive:
            break
        now = time.monotonic()
        for index, child in list(children.items()):
            code = child.poll()
            if code is None or stopping.is_set():
                continue
            if index not in restart_at:
                # A process that dies soon after its start (a bad setting, a taken port)
                # is restarted with a growing delay, not in a tight loop.
                quick = now - started_at[index] < RESTART_RESET_SECONDS
                failures[index] = failures.get(index, 0) + 1 if quick else 1
                delay = min(RESTART_MAX_SECONDS, 2 ** (failures[index] - 1))
                restart_at[index] = now + delay
                log.warning("worker_process_exited", index=index, code=code,
                            restart_in_s=delay)
            elif now >= restart_at[index]:
                del restart_at[index]
                spawn(index)
                started_at[index] = time.monotonic()
        time.sleep(0.2)
    log.info("supervisor_stopped")
    if any(c.returncode not in (0, -signal.SIGTERM, -signal.SIGINT) for c in children.values()):
        raise RunnerError("a worker process exited with an error")
