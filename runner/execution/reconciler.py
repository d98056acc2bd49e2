"""The reconciler: makes Redis and Docker agree with the database, which is the truth.

One pass (`runner reconcile`, at worker start, and every few seconds in each worker,
one worker at a time through a Redis lock):

1. running runs whose lease expired are fenced first: one conditional write takes
   the attempt from its worker (retried as `worker_lost` but held, dead-lettered, or
   canceled if a cancel was pending), so a worker that renewed in the meantime keeps
   its run and its container; then the old containers are killed and removed; then
   a held retry is made due, so it never overlaps the container before it;
2. queued runs that are due (a retry past its backoff, or a first attempt older than
   the grace period) but that Redis does not hold are enqueued;
3. containers labelled by this runner whose run is finished, unknown, or on another
   attempt are removed once older than the grace period. Unlabelled containers are
   never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from runner.control.retry import decide
from runner.domain import ErrorCode, Finish, Run, RunStatus, utcnow
from runner.errors import RunnerError, SandboxError, ServiceUnavailableError
from runner.execution.ports import FilesPort, QueuePort, RunLedger, SandboxPort
from runner.manifest import ManifestSource, RetryPolicy
from runner.sandbox import ATTEMPT_LABEL, RUN_LABEL

log = structlog.get_logger(__name__)

LOCK_KEY = "runner:reconciler:lock"
# The half-second requeue pass: one process at a time, for a little less than the
# interval, over at most FAST_PASS_DUE runs; the full pass looks at FULL_PASS_DUE.
REQUEUE_LOCK_KEY = "runner:reconciler:requeue"
REQUEUE_LOCK_SECONDS = 0.4
FAST_PASS_DUE, FULL_PASS_DUE = 50, 500
NO_FIRST_ATTEMPTS = datetime(1970, 1, 1, tzinfo=UTC)
FULL_SCAN_MAX = 100_000  # due queued runs one full pass looks through at most
FOREIGN_RUN_PATIENCE_SECONDS = 300


@dataclass
class Report:
    expired: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    removed_containers: list[str] = field(default_factory=list)
    pruned: int = 0  # runs deleted by retention
    pruned_files: int = 0  # uploaded files no kept run refers to, past retention
    swept_blobs: int = 0  # unfinished uploads and unreferenced blobs removed
    skipped: bool = False

    def __bool__(self) -> bool:
        return bool(self.expired or self.requeued or self.removed_containers or self.pruned
                    or self.pruned_files or self.swept_blobs)


@dataclass
class Reconciler:
    ledger: RunLedger
    queue: QueuePort
    sandbox: SandboxPort | None
    manifests: ManifestSource
    grace_seconds: float = 10.0
    stop_grace_seconds: float = 5.0
    # Short, so a worker killed while holding the lock delays the others only briefly.
    lock_seconds: float = 5.0
    # RUNNER_RETENTION_DAYS: runs that ended longer ago are deleted, a batch per pass
    # (0: kept for ever).
    retention_days: float = 0.0
    retention_batch: int = 500
    # How long a retry taken back from a lost worker waits at most for the old
    # container's removal before it may start anyway (the reconciler died mid-way).
    hold_seconds: float = 60.0
    # The file store: retention of files, and the sweep of blobs nothing refers to
    # (older than `orphan_grace_seconds`), at most every `file_sweep_seconds`.
    files: FilesPort | None = None
    orphan_grace_seconds: float = 3600.0
    file_sweep_seconds: float = 300.0
    # The deployment (RUNNER_INSTANCE_NAME or its default): its locks are its own, so
    # deployments sharing a Redis server never skip each other's passes.
    instance: str = ""
    _swept_at: float = field(default=float("-inf"), repr=False)

    def _lock(self, key: str) -> str:
        return f"{key}:{self.instance}" if self.instance else key

    def run_once(self) -> Report:
        """One pass; skipped when another process holds the reconciler lock."""
        token = f"{utcnow().timestamp()}"
        try:
            if not self.queue.try_lock(self._lock(LOCK_KEY), token,
                                       seconds=self.lock_seconds):
                return Report(skipped=True)
        except ServiceUnavailableError as exc:
            log.warning("reconcile_lock_unavailable", error=exc.message)
            token = ""  # Redis is down: still recover leases and containers
        report = Report()
        try:
            self._expire_leases(report)
            self._requeue(report)
            self._sweep_containers(report)
            self._sweep_volumes()
            self._retention(report)
            self._sweep_files(report)
        finally:
            if token:
                self.queue.unlock(self._lock(LOCK_KEY), token)
        if report:
            log.info("reconciled", expired=report.expired, requeued=report.requeued,
                     removed_containers=report.removed_containers, pruned=report.pruned,
                     pruned_files=report.pruned_files, swept_blobs=report.swept_blobs)
        return report

    def _policy(self, run: Run) -> RetryPolicy | None:
        """The run's retry policy; None while another pool may own the decision.

        When this reconciler's manifest lacks the processor version, a worker pool
        with another manifest may know it: leave the run to that pool's reconciler for
        a while, then (the version was removed, say) end it under the default policy.
        """
        found = self.manifests.current().find(run.processor, run.version)
        if found is not None:
            return found.retry
        expired = run.lease_expires_at or run.started_at or utcnow()
        if utcnow() - expired < timedelta(seconds=FOREIGN_RUN_PATIENCE_SECONDS):
            return None
        return RetryPolicy()

    def _expire_leases(self, report: Report) -> None:
        """Fence, then kill, then make due: the run is taken from its worker in one
        conditional write first (a worker that renewed in between keeps it, and its
        container), its containers are removed next, and only then may a retry start."""
        for run in self.ledger.expired_leases():
            policy = self._policy(run)
            if self.sandbox is None or policy is None:
                continue  # without the engine we cannot be sure the container is gone
            try:  # an engine that does not answer cannot make sure the container dies
                self.sandbox.managed_containers(**{RUN_LABEL: run.id})
            except SandboxError as exc:
                log.warning("lease_expiry_deferred", run_id=run.id, error=exc.message)
                continue
            finish = self._lease_end(run, policy)
            hold_until = utcnow() + timedelta(seconds=self.hold_seconds)
            if not self.ledger.take_back(run.id, run.attempt, finish, hold_until=hold_until):
                continue  # renewed meanwhile: the worker is alive and keeps its run
            report.expired.append(run.id)
            log.warning("lease_expired", run_id=run.id, attempt=run.attempt,
                        worker_id=run.worker_id, now=finish.status)
            try:
                for container in self.sandbox.managed_containers(**{RUN_LABEL: run.id}):
                    self.sandbox.remove(container["Id"])
            except SandboxError as exc:
                # The retry stays held until `hold_seconds` pass; the sweep removes the
                # container once the engine answers again.
                log.warning("lease_expiry_kill_deferred", run_id=run.id, error=exc.message)
                continue
            if finish.status is RunStatus.QUEUED:
                self.ledger.release_hold(run.id, run.attempt, due_at=finish.next_attempt_at)

    def _lease_end(self, run: Run, policy: RetryPolicy) -> Finish:
        """What an attempt whose worker stopped renewing its lease becomes."""
        if run.cancel_requested_at is not None:
            return Finish(RunStatus.CANCELED, error_code=ErrorCode.CANCELED,
                          error_stage="lease", error_message="canceled; its worker was lost")
        return decide(Finish(
            RunStatus.FAILED, error_code=ErrorCode.WORKER_LOST, error_stage="lease",
            error_message=f"worker {run.worker_id} stopped renewing its lease"),
            policy=policy, attempt=run.attempt, now=utcnow())


    def requeue_due(self, *, limit: int = FULL_PASS_DUE, exclusive: bool = False
                    ) -> list[str]:
        """Enqueue queued runs that are due but not in Redis: retries whose backoff is
        over, and first attempts lost on the way (after the grace period), up to
        `limit` of them, retries first; their Redis jobs are checked in one round trip.

        Workers run it every half second with `exclusive`: then one process of the
        deployment at a time (a short Redis lock) looks at due retries only. A deep
        queue makes every old first attempt a candidate, and checking them twice a
        second would cost in proportion to the backlog; a lost first attempt waits
        for the full pass instead (every RUNNER_RECONCILE_INTERVAL_SECONDS).
        """
        if exclusive:
            try:
                if not self.queue.try_lock(self._lock(REQUEUE_LOCK_KEY), "1",
                                           seconds=REQUEUE_LOCK_SECONDS):
                    return []
            except RunnerError as exc:
                log.warning("requeue_failed", error=exc.message)
                return []
        requeued: list[str] = []
        try:
            if exclusive:  # a cutoff no first attempt is older than: retries only
                due = self.ledger.due_queued(older_than=NO_FIRST_ATTEMPTS, limit=limit)
                held = self.queue.holding(due)
                missing = [run for run in due if run.id not in held]
            else:
                missing = self._missing(utcnow() - timedelta(seconds=self.grace_seconds),
                                        limit)
        except RunnerError as exc:
            log.warning("requeue_failed", error=exc.message)
            return requeued
        for run in missing:
            try:
                if not self.queue.enqueue_once(run,
                                               stop_grace_seconds=self.stop_grace_seconds):
                    continue
            except RunnerError as exc:
                log.warning("requeue_failed", run_id=run.id, error=exc.message)
                break
            requeued.append(run.id)
        return requeued

    def _missing(self, cutoff: datetime, limit: int) -> list[Run]:
        """Up to `limit` due runs that Redis does not hold, from the whole backlog of due
        queued runs (up to FULL_SCAN_MAX), scanned by id and attempt only: behind a deep
        queue, a lost run newer than the oldest few hundred must still be found."""
        keys = self.ledger.due_queued_keys(older_than=cutoff, limit=FULL_SCAN_MAX)
        held = self.queue.holding_keys(keys)
        found = []
        for run_id, attempt in keys:
            if run_id in held:
                continue
            run = self.ledger.get_run(run_id)
            if run is not None and run.status is RunStatus.QUEUED and run.attempt == attempt:
                found.append(run)
                if len(found) >= limit:
                    break
        return found

    def _requeue(self, report: Report) -> None:
        report.requeued += self.requeue_due()
        self.ledger.release_stale_slots()
        self._wake_parked()

    def _wake_parked(self) -> None:
        """Wake parked runs of each capped processor that has free slots: the release
        of a slot wakes one itself, so this only catches a wake that was lost (a
        slot freed between a claim's look and its parking, or a crash)."""
        held = self.ledger.slots_held()
        for processor in self.manifests.current().processors:
            if processor.max_concurrency is not None:
                free = processor.max_concurrency - held.get(processor.name, 0)
                if free > 0:
                    self.ledger.wake_parked(processor.name, free)

    def _retention(self, report: Report) -> None:
        """Delete one batch of runs past the retention period (logs and attempts too)."""
        if self.retention_days <= 0:
            return
        cutoff = utcnow() - timedelta(days=self.retention_days)
        report.pruned = self.ledger.prune_runs_ended_before(cutoff=cutoff,
                                                            batch=self.retention_batch)
        if self.files is not None:
            try:
                report.pruned_files = self.files.prune_files(cutoff=cutoff)
            except ServiceUnavailableError as exc:
                log.warning("file_retention_failed", error=exc.message)

    def _sweep_files(self, report: Report, *, force: bool = False) -> None:
        """Remove blobs of crashed uploads and blobs no file or artifact refers to any
        more (their runs were deleted), once past the orphan grace period."""
        if self.files is None:
            return
        now = time.monotonic()
        if not force and now - self._swept_at < self.file_sweep_seconds:
            return
        self._swept_at = now
        try:
            swept = self.files.sweep_blobs(grace_seconds=self.orphan_grace_seconds)
        except ServiceUnavailableError as exc:
            log.warning("blob_sweep_failed", error=exc.message)
            return
        report.swept_blobs = swept["temp"] + swept["unreferenced"]

    def sweep_files_now(self) -> Report:
        """One sweep of the file store, whenever the last one was (`runner reconcile`)."""
        report = Report()
        self._sweep_files(report, force=True)
        return report

    def _sweep_containers(self, report: Report) -> None:
        if self.sandbox is None:
            return
        cutoff = datetime.now(UTC) - timedelta(seconds=self.grace_seconds)
        try:
            containers = self.sandbox.managed_containers()
        except SandboxError as exc:
            log.warning("container_sweep_failed", error=exc.message)
            return
        for container in containers:
            labels = container.get("Labels") or {}
            run_id, attempt = labels.get(RUN_LABEL), labels.get(ATTEMPT_LABEL)
            if datetime.fromtimestamp(container.get("Created", 0), UTC) > cutoff:
                continue
            run = self.ledger.get_run(run_id) if run_id else None
            if (run is not None and run.status is RunStatus.RUNNING
                    and attempt == str(run.attempt)):
                continue  # the live attempt's own container
            try:
                self.sandbox.remove(container["Id"])
            except SandboxError as exc:
                log.warning("container_remove_failed", container_id=container["Id"],
                            error=exc.message)
                continue
            report.removed_containers.append(container["Id"])

    def _sweep_volumes(self) -> None:
        """Remove this deployment's /run volumes and run filesystems that nothing uses
        any more, once older than the grace period: left by a container removed
        without its volumes, or by a worker that died between its run's end and their
        removal."""
        if self.sandbox is None:
            return
        cutoff = datetime.now(UTC).timestamp() - self.grace_seconds
        try:
            volumes = self.sandbox.managed_volumes()
        except SandboxError as exc:
            log.warning("volume_sweep_failed", error=exc.message)
            return
        for volume in volumes:
            if volume.get("InUse") or volume.get("Created", 0) > cutoff:
                continue
            try:
                self.sandbox.remove_volume(volume["Name"])
            except SandboxError as exc:
                log.warning("volume_remove_failed", volume=volume["Name"], error=exc.message)
                continue
            log.info("volume_removed", volume=volume["Name"], kind=volume.get("Kind"))
