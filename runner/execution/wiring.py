"""Builds a worker process's services once, the way `api/deps.py` does for the API.

One `Store`, one `RunQueue`, one `ManifestSource`, one `Lifecycle` (with the run-end
listeners), one `Ledger`, one file store, one `Sandbox` and (with webhooks configured)
one `WebhookSender` per process; the executor, the reconciler thread and the sender's
thread share them. Also the settings-to-sandbox mapping that
`runner processor run` reuses, so a local run gets the workers' container settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from opentelemetry import trace

from runner.control.delivery import WebhookSender
from runner.control.files import catalog_for
from runner.control.ledger import Ledger
from runner.control.lifecycle import Lifecycle
from runner.control.notify import RunEndNotice
from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.execution.executor import Executor
from runner.execution.files import WorkerFiles
from runner.execution.ports import FaultHook, SandboxPort, no_fault
from runner.execution.reconciler import Reconciler
from runner.manifest import ManifestSource
from runner.observability.metrics import WorkerMetrics
from runner.sandbox import Sandbox, SandboxConfig
from runner.settings import Settings


def sandbox_config(settings: Settings) -> SandboxConfig:
    """The platform's container settings, as every worker applies them."""
    return SandboxConfig(user=settings.container_user, tmp_size_bytes=settings.tmp_size,
                         stop_grace_seconds=settings.stop_grace_seconds,
                         result_max_bytes=settings.result_max_bytes,
                         instance=settings.instance,
                         direct_volume_io=settings.direct_volume_io,
                         require_run_bound=settings.run_output_bound == "required",
                         artifact_max_files=settings.artifact_max_files)


def control_side(settings: Settings, *, store: Store | None = None
                 ) -> tuple[Store, RunQueue, Ledger]:
    """The database and Redis side of a process: its store, queue and ledger, with the
    run-end notice listening on every final status."""
    store = store or Store(settings.database_url)
    queue = RunQueue.from_url(settings.redis_url, fair=settings.fair_dequeue == "on")
    lifecycle = Lifecycle(store, listeners=[RunEndNotice(queue.redis, settings.instance)])
    return store, queue, Ledger(store, lifecycle)


@dataclass
class WorkerServices:
    """Everything one worker process talks to, built once."""

    settings: Settings
    store: Store
    queue: RunQueue
    ledger: Ledger
    manifests: ManifestSource
    sandbox: SandboxPort | None
    files: WorkerFiles
    # Sends webhook deliveries in a thread of its own (`run_worker` starts it); None
    # when this process has no webhook settings.
    webhooks: WebhookSender | None = None

    @classmethod
    def build(cls, settings: Settings, *, store: Store | None = None,
              with_docker: bool = True, background_removal: bool = True) -> WorkerServices:
        """Connect to the database, Redis and (unless `with_docker` is False) Docker.

        Raises:
            DockerUnavailableError: the engine does not answer.
        """
        store, queue, ledger = control_side(settings, store=store)
        sandbox = None
        if with_docker:
            sandbox = Sandbox.from_env(replace(sandbox_config(settings),
                                               remove_in_background=background_removal),
                                       timeout=settings.pull_timeout_seconds)
        catalog = catalog_for(settings, store)
        webhooks = WebhookSender.from_settings(store, settings)
        if webhooks is not None:  # a run this process ends is sent at once, not at a poll
            ledger.lifecycle.listeners.append(webhooks.wake)
        return cls(settings=settings, store=store, queue=queue, ledger=ledger,
                   manifests=ManifestSource(settings.manifest), sandbox=sandbox,
                   files=WorkerFiles(catalog), webhooks=webhooks)

    def executor(self, *, tracer: trace.Tracer | None = None,
                 metrics: WorkerMetrics | None = None, fault: FaultHook = no_fault
                 ) -> Executor:
        assert self.sandbox is not None, "an executor needs Docker"
        s = self.settings
        return Executor(ledger=self.ledger, manifests=self.manifests, sandbox=self.sandbox,
                        worker_id=s.worker_id, lease_seconds=s.lease_seconds,
                        heartbeat_seconds=s.heartbeat_seconds,
                        stop_grace_seconds=s.stop_grace_seconds,
                        tracer=tracer or trace.NoOpTracer(), metrics=metrics, fault=fault,
                        files=self.files, host_id=s.host_id)

    def reconciler(self) -> Reconciler:
        s = self.settings
        return Reconciler(ledger=self.ledger, queue=self.queue, sandbox=self.sandbox,
                          manifests=self.manifests, grace_seconds=s.reconcile_grace_seconds,
                          stop_grace_seconds=s.stop_grace_seconds,
                          lock_seconds=max(2.0, 2 * s.reconcile_interval_seconds),
                          retention_days=s.retention_days, files=self.files,
                          orphan_grace_seconds=s.file_orphan_grace_seconds,
                          file_sweep_seconds=s.file_sweep_interval_seconds,
                          instance=s.instance)

    def close(self) -> None:
        self.store.close()


def build_reconciler(settings: Settings, *, store: Store | None = None,
                     with_docker: bool = True) -> Reconciler:
    """A reconciler of its own (`runner reconcile`, tests)."""
    return WorkerServices.build(settings, store=store, with_docker=with_docker,
                                background_removal=False).reconciler()
