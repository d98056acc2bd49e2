"""`Ledger`: the worker side's one door to the control layer.

The execution layer (executor, guard, reconciler) reads and writes runs only through
these methods, in the order a run lives them: read it, claim an attempt, renew its
lease, record its container, append its output, finish it (a short attempt's
container record and output go with its end, in one transaction); and, for the
reconciler, find expired leases and due runs. Each is one call into `Lifecycle`
(status changes) or `Store` (everything else), so the path of a run reads top to
bottom in `runner.execution.executor` without hopping between the two.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from runner.control.lifecycle import AttemptTail, Claim, Heartbeat, Lifecycle
from runner.control.store import Store
from runner.domain import Finish, Run


class Ledger:
    """What a worker process may do to runs; one per process, thread-safe."""

    def __init__(self, store: Store, lifecycle: Lifecycle) -> None:
        self.store, self.lifecycle = store, lifecycle

    def get_run(self, run_id: str) -> Run | None:
        return self.store.get_run(run_id)

    def claim(self, run_id: str, *, attempt: int, worker_id: str, lease_seconds: float,
              max_concurrency: int | None = None, known: Run | None = None,
              host_id: str | None = None) -> Claim:
        """Start attempt `attempt`; only one claim ever wins it (`Lifecycle.claim`)."""
        return self.lifecycle.claim(run_id, attempt=attempt, worker_id=worker_id,
                                    lease_seconds=lease_seconds,
                                    max_concurrency=max_concurrency, known=known,
                                    host_id=host_id)

    def heartbeat(self, run_id: str, attempt: int, *, lease_seconds: float) -> Heartbeat:
        """Renew the lease; whether the attempt is still ours and a cancel came."""
        return self.lifecycle.heartbeat(run_id, attempt, lease_seconds=lease_seconds)

    def record_container(self, run_id: str, attempt: int, *, container_id: str | None = None,
                         image_id: str | None = None,
                         provenance: dict[str, Any] | None = None) -> None:
        self.store.record_container(run_id, attempt, container_id=container_id,
                                    image_id=image_id, provenance=provenance)

    def log_offset(self, run_id: str) -> int:
        """Bytes of output earlier attempts left: where this attempt's output starts."""
        return self.store.log_offset(run_id)

    def append_log(self, run_id: str, attempt: int, *, offset: int, data: bytes) -> None:
        """One chunk of output, fenced by the attempt still running."""
        self.store.append_log(run_id, attempt, offset=offset, data=data)

    def finish(self, run_id: str, attempt: int, outcome: Finish, *,
               only_if_lease_expired: bool = False, tail: AttemptTail | None = None) -> bool:
        """Record the attempt's end, with its `tail` (last output, container record) in
        the same transaction; False if it had lost the run (`Lifecycle.finish`)."""
        return self.lifecycle.finish(run_id, attempt, outcome,
                                     only_if_lease_expired=only_if_lease_expired, tail=tail)

    # The reconciler's side ----------------------------------------------------------

    def take_back(self, run_id: str, attempt: int, outcome: Finish, *,
                  hold_until: datetime) -> bool:
        """Fence an expired attempt away from its worker (`Lifecycle.take_back`)."""
        return self.lifecycle.take_back(run_id, attempt, outcome, hold_until=hold_until)

    def release_hold(self, run_id: str, attempt: int, *, due_at: datetime | None) -> bool:
        return self.lifecycle.release_hold(run_id, attempt, due_at=due_at)

    def expired_leases(self) -> list[Run]:
        return self.lifecycle.expired_leases()

    def due_queued(self, *, older_than: datetime, limit: int = 500) -> list[Run]:
        return self.lifecycle.due_queued(older_than=older_than, limit=limit)

    def due_queued_keys(self, *, older_than: datetime, limit: int) -> list[tuple[str, int]]:
        return self.lifecycle.due_queued_keys(older_than=older_than, limit=limit)

    def release_stale_slots(self) -> int:
        return self.lifecycle.release_stale_slots()

    def slots_held(self) -> dict[str, int]:
        return self.lifecycle.slots_held()

    def wake_parked(self, processor: str, count: int = 1) -> int:
        return self.lifecycle.wake_parked(processor, count)

    def prune_runs_ended_before(self, *, cutoff: datetime, batch: int = 500) -> int:
        """Retention: one batch of runs that ended before `cutoff`, deleted."""
        return self.store.prune_runs_ended_before(cutoff=cutoff, batch=batch)

    def ping(self) -> None:
        self.store.ping()

    def close(self) -> None:
        self.store.close()
