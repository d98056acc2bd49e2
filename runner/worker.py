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
from contextvars import ContextVar
from types import FrameType
from typing import Any

import structlog
from rq import Queue
from rq.worker import SimpleWorker

from runner.errors import RunnerError
from runner.executor import Executor
from runner.faults import Faults
from runner.lifecycle import Lifecycle
from runner.manifest import ManifestSource
from runner.queue import RunQueue
from runner.reconciler import Reconciler
from runner.sandbox import Sandbox, SandboxConfig
from runner.settings import Settings
from runner.store import Store

log = structlog.get_logger(__name__)

# The executor of the worker running in this thread; set once by `run_worker`.
current_executor: ContextVar[Executor] = ContextVar("current_executor")


def perform(run_id: str, attempt: int) -> str | None:
    """The RQ job: execute one attempt of `run_id` (takes an id, never an object)."""
    status = current_executor.get().execute(run_id, attempt)
    return status.value if status is not None else None


def sandbox_config(settings: Settings) -> SandboxConfig:
    return SandboxConfig(user=settings.container_user, tmp_size_bytes=settings.tmp_size,
                         stop_grace_seconds=settings.stop_grace_seconds,
                         result_max_bytes=settings.result_max_bytes,
                         instance=settings.instance)


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


def build_executor(settings: Settings) -> Executor:
    store = Store(settings.database_url)
    return Executor(store=store, lifecycle=Lifecycle(store),
                    manifests=ManifestSource(settings.manifest),
                    sandbox=Sandbox.from_env(sandbox_config(settings),
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

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]  # idle: raises
        log.info("worker_draining", timeout_s=self.drain_timeout_seconds)
        timer = threading.Timer(max(self.drain_timeout_seconds, 1.1),
                                os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()


REQUEUE_SECONDS = 0.5


def _reconcile_forever(reconciler: Reconciler, interval: float, stop: threading.Event) -> None:
    """Enqueue due retries every half second; a full reconcile pass every `interval`."""
    next_pass = time.monotonic() + interval
    while not stop.wait(min(REQUEUE_SECONDS, interval)):
        try:  # the loop must outlive a bad pass
            if time.monotonic() >= next_pass:
                next_pass = time.monotonic() + interval
                reconciler.run_once()
            else:
                reconciler.requeue_due()
        except Exception:
            log.exception("reconcile_failed")


def run_worker(settings: Settings, *, queues: list[str] | None = None,
               burst: bool = False) -> None:
    """Serve jobs from `queues` (in priority order) until stopped."""
    executor = build_executor(settings)
    executor.sandbox.ping()
    executor.store.ping()
    executor.queue.ping()
    names = queues or [settings.queue]
    structlog.contextvars.bind_contextvars(worker_id=settings.worker_id)
    reconciler = build_reconciler(settings)
    reconciler.run_once()
    stop = threading.Event()
    threading.Thread(target=_reconcile_forever, daemon=True, name="reconciler",
                     args=(reconciler, settings.reconcile_interval_seconds, stop)).start()
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
        stop.set()
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
        children[index] = subprocess.Popen(args, env=env)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(1, concurrency + 1):
        spawn(index)
    log.info("supervisor_started", workers=concurrency)
    while True:
        alive = [c for c in children.values() if c.poll() is None]
        if stopping.is_set() and not alive:
            break
        for index, child in list(children.items()):
            code = child.poll()
            if code is not None and not stopping.is_set():
                log.warning("worker_process_exited", index=index, code=code)
                time.sleep(1)
                spawn(index)
        time.sleep(0.2)
    log.info("supervisor_stopped")
    if any(c.returncode not in (0, -signal.SIGTERM, -signal.SIGINT) for c in children.values()):
        raise RunnerError("a worker process exited with an error")
