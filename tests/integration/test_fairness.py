"""Fair dequeue with a real worker: a tenant's backlog does not hold another tenant's
next run back, and priority orders a tenant's own runs."""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from pathlib import Path

from runner.control.batches import submit_batch
from runner.control.lifecycle import Lifecycle
from runner.control.queue import RunQueue
from runner.control.runs import Submission
from runner.control.store import Store
from runner.domain import Priority, Run
from runner.errors import ConflictError
from runner.manifest import ManifestSource
from runner.settings import Settings
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_until


def started(store: Store, run_id: str) -> datetime | None:
    run = store.get_run(run_id)
    return run.started_at if run is not None else None


def test_a_backlog_does_not_hold_back_another_tenants_run_nor_a_high_priority_one(
        settings: Settings, store: Store, tmp_path: Path) -> None:
    own = settings.model_copy(update={"queue": f"fair-{uuid.uuid4().hex[:8]}",
                                      "worker_id": f"fair-{uuid.uuid4().hex[:6]}"})
    manifest, queue = ManifestSource(own.manifest).current(), RunQueue.from_url(own.redis_url)

    def batch(tenant: str, count: int, priority: Priority = Priority.NORMAL) -> list[Run]:
        results = submit_batch(
            [Submission(tenant=tenant, processor="sleep", version=None,
                        input={"seconds": 0.2}, priority=priority) for _ in range(count)],
            admit=lambda n: n, manifest=manifest, store=store, queue=queue,
            default_queue=own.queue, stop_grace_seconds=1)
        assert all(isinstance(r, Run) for r in results), results
        return [r for r in results if isinstance(r, Run)]

    backlog = batch("tenant-a", 40, Priority.LOW)  # queued before any worker runs
    worker = WorkerProcess(own, tmp_path / "worker.log")
    try:
        wait_until(lambda: started(store, backlog[1].id) is not None, timeout=60,
                   message="the worker did not start on the backlog")
        urgent = batch("tenant-a", 1, Priority.HIGH)[0]
        other = batch("tenant-b", 1)[0]
        wait_until(lambda: None not in (started(store, urgent.id), started(store, other.id)),
                   timeout=60, message="the late runs did not start")
        late = min(started(store, urgent.id), started(store, other.id))  # type: ignore[type-var]
        last = max(started(store, urgent.id), started(store, other.id))  # type: ignore[type-var]
        # Between their submission and their start, only runs already under way (or
        # handed to the worker) went ahead: a handful, never the 40-run backlog.
        ahead = [r.id for r in backlog if (s := started(store, r.id)) is not None
                 and urgent.created_at < s < last]
        assert len(ahead) <= 2, (len(ahead), late, last)
        queued = [r for r in backlog if started(store, r.id) is None]
        assert len(queued) >= 30  # the backlog was really there, behind them
    finally:
        worker.stop()
        for run in backlog:  # what is left of it never starts
            with contextlib.suppress(ConflictError):
                Lifecycle(store).cancel(run.id, tenant=None)
