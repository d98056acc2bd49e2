"""The reconciler on SQLite with a fake sandbox and a fake queue: expired leases taken
back (fenced first, then their containers killed, then made due), due runs requeued
once, leftover containers swept, and the lock and a Redis outage. No Docker, no Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from runner.control.ledger import Ledger
from runner.control.lifecycle import ClaimStatus, Lifecycle
from runner.control.store import Store
from runner.domain import ErrorCode, Finish, Run, RunStatus, utcnow
from runner.errors import DockerUnavailableError
from runner.execution.reconciler import FAST_PASS_DUE, FULL_PASS_DUE, Reconciler
from runner.manifest import ManifestSource
from tests.support.fakes import FakeQueue, FakeSandbox
from tests.unit.conftest import ManifestMaker, NewRunMaker, past, set_run

NO_RETRY = "{max_attempts: 1}"


class RecordingLedger(Ledger):
    """The real ledger, noting each write in the fake sandbox's call log (for order),
    with a hook run just after the expired leases are read."""

    def __init__(self, store: Store, lifecycle: Lifecycle, calls: list[tuple[str, str]]
                 ) -> None:
        super().__init__(store, lifecycle)
        self.calls = calls
        self.after_reading_leases: Callable[[list[Run]], None] | None = None

    def expired_leases(self) -> list[Run]:
        found = super().expired_leases()
        if self.after_reading_leases is not None:
            self.after_reading_leases(found)
        return found

    def finish(self, run_id: str, attempt: int, outcome: Finish, *,
               only_if_lease_expired: bool = False) -> bool:
        self.calls.append(("finish", run_id))
        return super().finish(run_id, attempt, outcome,
                              only_if_lease_expired=only_if_lease_expired)

    def take_back(self, run_id: str, attempt: int, outcome: Finish, *,
                  hold_until: datetime) -> bool:
        taken = super().take_back(run_id, attempt, outcome, hold_until=hold_until)
        self.calls.append(("take_back" if taken else "take_back_refused", run_id))
        return taken

    def release_hold(self, run_id: str, attempt: int, *, due_at: datetime | None) -> bool:
        self.calls.append(("release_hold", run_id))
        return super().release_hold(run_id, attempt, due_at=due_at)


@pytest.fixture
def sandbox() -> FakeSandbox:
    return FakeSandbox()


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


ReconcilerMaker = Callable[..., Reconciler]


@pytest.fixture
def make_reconciler(store: Store, lifecycle: Lifecycle, sandbox: FakeSandbox,
                    queue: FakeQueue, manifests: ManifestSource) -> ReconcilerMaker:
    def make(**options: Any) -> Reconciler:
        options.setdefault("sandbox", sandbox)
        options.setdefault("manifests", manifests)
        options.setdefault("grace_seconds", 0)
        return Reconciler(ledger=RecordingLedger(store, lifecycle, sandbox.calls),
                          queue=queue, **options)

    return make


@pytest.fixture
def reconciler(make_reconciler: ReconcilerMaker) -> Reconciler:
    return make_reconciler()


def running(lifecycle: Lifecycle, run: Run, *, attempt: int = 1) -> Run:
    got = lifecycle.claim(run.id, attempt=attempt, worker_id="gone", lease_seconds=60)
    assert got.status is ClaimStatus.CLAIMED and got.run is not None
    return got.run


def current(store: Store, run_id: str) -> Run:
    run = store.get_run(run_id)
    assert run is not None
    return run


# Expired leases ------------------------------------------------------------------------

@pytest.mark.parametrize(("retry", "cancel", "status", "code"), [
    (None, False, RunStatus.QUEUED, ErrorCode.WORKER_LOST),
    (NO_RETRY, False, RunStatus.DEAD_LETTER, ErrorCode.WORKER_LOST),
    (None, True, RunStatus.CANCELED, ErrorCode.CANCELED),
], ids=["retried", "dead-letter", "cancel-pending"])
def test_an_expired_lease_is_fenced_then_killed_then_made_due(
        retry: str | None, cancel: bool, status: RunStatus, code: ErrorCode,
        make_reconciler: ReconcilerMaker, make_manifests: ManifestMaker,
        lifecycle: Lifecycle, store: Store, sandbox: FakeSandbox,
        new_run: NewRunMaker) -> None:
    manifests = make_manifests(retry=retry) if retry else make_manifests()
    run = running(lifecycle, new_run())
    container = sandbox.add_container(run_id=run.id, attempt=1)
    if cancel:
        lifecycle.cancel(run.id, tenant="t")
    set_run(store, run.id, lease_expires_at=past(5))
    report = make_reconciler(manifests=manifests).run_once()
    assert report.expired == [run.id]
    assert sandbox.removed == [container]
    calls = sandbox.calls
    # Fence first (the worker can no longer renew or write), then kill the container,
    # then (a retry only) make the run due.
    assert calls.index(("take_back", run.id)) < calls.index(("remove", container))
    if status is RunStatus.QUEUED:
        assert calls.index(("remove", container)) < calls.index(("release_hold", run.id))
    else:
        assert ("release_hold", run.id) not in calls
    after = current(store, run.id)
    assert (after.status, after.error_code, after.error_stage) == (status, code, "lease")
    assert after.lease_expires_at is None


def test_a_retried_lost_run_is_enqueued_in_the_same_pass(reconciler: Reconciler,
                                                         lifecycle: Lifecycle, store: Store,
                                                         queue: FakeQueue,
                                                         new_run: NewRunMaker) -> None:
    run = running(lifecycle, new_run())
    set_run(store, run.id, lease_expires_at=past(5))
    report = reconciler.run_once()
    assert report.expired == [run.id]
    assert report.requeued == [run.id]  # the test policy has no backoff: due at once
    assert queue.jobs == {(run.id, 2)}


def test_a_live_lease_is_left_alone(reconciler: Reconciler, lifecycle: Lifecycle,
                                    store: Store, sandbox: FakeSandbox,
                                    new_run: NewRunMaker) -> None:
    run = running(lifecycle, new_run())
    container = sandbox.add_container(run_id=run.id, attempt=1)
    report = reconciler.run_once()
    assert report.expired == [] and not report
    assert sandbox.removed == [] and container in sandbox.containers
    assert current(store, run.id) == run


def test_a_lease_renewed_after_it_was_read_keeps_its_run_and_container(
        make_reconciler: ReconcilerMaker, lifecycle: Lifecycle, store: Store,
        sandbox: FakeSandbox, new_run: NewRunMaker) -> None:
    """Regression: the reconciler removed an expired run's containers and only then
    fenced; a worker whose heartbeat renewed the lease in between kept a run with no
    container and dead-lettered it as internal_error."""
    run = running(lifecycle, new_run())
    container = sandbox.add_container(run_id=run.id, attempt=1)
    set_run(store, run.id, lease_expires_at=past(5))
    reconciler = make_reconciler()
    ledger = reconciler.ledger
    assert isinstance(ledger, RecordingLedger)

    def worker_renews(found: list[Run]) -> None:
        assert [r.id for r in found] == [run.id]  # read as expired ...
        beat = lifecycle.heartbeat(run.id, 1, lease_seconds=60)  # ... then renewed
        assert beat.owned

    ledger.after_reading_leases = worker_renews
    report = reconciler.run_once()
    assert report.expired == []
    assert ("take_back_refused", run.id) in sandbox.calls
    assert sandbox.removed == [] and container in sandbox.containers
    after = current(store, run.id)
    assert (after.status, after.attempt) == (RunStatus.RUNNING, 1)
    assert lifecycle.heartbeat(run.id, 1, lease_seconds=60).owned


def test_a_taken_back_retry_is_held_until_its_container_is_gone(
        make_reconciler: ReconcilerMaker, lifecycle: Lifecycle, store: Store,
        sandbox: FakeSandbox, new_run: NewRunMaker) -> None:
    """While the old container cannot be removed, the retry is not due (no overlap);
    the worker's late heartbeat is told it no longer owns the attempt."""
    run = running(lifecycle, new_run())
    sandbox.add_container(run_id=run.id, attempt=1)
    set_run(store, run.id, lease_expires_at=past(5))
    reconciler = make_reconciler()
    sandbox.fail_removal = DockerUnavailableError("engine gone", stage="remove")
    assert reconciler.run_once().expired == [run.id]
    held = current(store, run.id)
    assert held.status is RunStatus.QUEUED
    assert held.next_attempt_at is not None and held.next_attempt_at > utcnow() + timedelta(
        seconds=reconciler.hold_seconds - 30)
    assert lifecycle.claim(run.id, attempt=2, worker_id="other",
                           lease_seconds=60).status is ClaimStatus.NOT_DUE
    assert not lifecycle.heartbeat(run.id, 1, lease_seconds=60).owned


def test_without_the_engine_an_expired_lease_waits(make_reconciler: ReconcilerMaker,
                                                   lifecycle: Lifecycle, store: Store,
                                                   sandbox: FakeSandbox,
                                                   new_run: NewRunMaker) -> None:
    run = running(lifecycle, new_run())
    set_run(store, run.id, lease_expires_at=past(5))
    assert make_reconciler(sandbox=None).run_once().expired == []
    sandbox.fail_listing = DockerUnavailableError("engine gone", stage="list")
    assert make_reconciler().run_once().expired == []
    assert current(store, run.id).status is RunStatus.RUNNING
    sandbox.fail_listing = None
    assert make_reconciler().run_once().expired == [run.id]


def test_a_run_of_a_processor_this_manifest_lacks_is_left_to_its_pool(
        make_reconciler: ReconcilerMaker, make_manifests: ManifestMaker,
        lifecycle: Lifecycle, store: Store, new_run: NewRunMaker) -> None:
    run = running(lifecycle, new_run())
    set_run(store, run.id, lease_expires_at=past(5))
    other_pool = make_reconciler(manifests=make_manifests(name="other"))
    assert other_pool.run_once().expired == []
    assert current(store, run.id).status is RunStatus.RUNNING
    set_run(store, run.id, lease_expires_at=past(3600))  # long gone: default policy
    assert other_pool.run_once().expired == [run.id]
    assert current(store, run.id).status is RunStatus.DEAD_LETTER


# Requeue -------------------------------------------------------------------------------

def test_a_due_run_absent_from_the_queue_is_enqueued_once(reconciler: Reconciler,
                                                          queue: FakeQueue,
                                                          new_run: NewRunMaker) -> None:
    run = new_run()
    assert reconciler.run_once().requeued == [run.id]
    assert queue.enqueued == [run.id] and queue.holds(run)
    assert reconciler.run_once().requeued == []  # the queue holds it now
    assert queue.enqueued == [run.id]


def test_a_run_the_queue_holds_is_not_enqueued(reconciler: Reconciler, queue: FakeQueue,
                                               new_run: NewRunMaker) -> None:
    held, lost = new_run(), new_run()
    queue.hold(held)
    assert reconciler.run_once().requeued == [lost.id]
    assert queue.enqueued == [lost.id]


def test_the_half_second_pass_runs_in_one_process_at_a_time_over_due_retries(
        reconciler: Reconciler, queue: FakeQueue, store: Store,
        new_run: NewRunMaker) -> None:
    """With a deep queue every old queued run is a candidate: the frequent pass looks
    only at due retries, and only while no other process of the deployment is doing
    it; the full pass finds the lost first attempts."""
    lost = [new_run() for _ in range(8)]
    retries = [new_run() for _ in range(3)]
    for run in retries:
        set_run(store, run.id, next_attempt_at=past(1))
    queue.lock_holder = "another worker"
    assert reconciler.requeue_due(limit=FAST_PASS_DUE, exclusive=True) == []
    assert queue.enqueued == []
    queue.lock_holder = None
    assert sorted(reconciler.requeue_due(limit=FAST_PASS_DUE, exclusive=True)) == sorted(
        r.id for r in retries)
    assert sorted(reconciler.requeue_due()) == sorted(r.id for r in lost)


def test_a_lost_run_behind_a_deep_held_backlog_is_found(
        reconciler: Reconciler, queue: FakeQueue, new_run: NewRunMaker) -> None:
    """The oldest queued runs are all candidates and all still in Redis: the full pass
    looks past them (by id and attempt only) to the one Redis lost."""
    for _ in range(FULL_PASS_DUE + 20):
        queue.hold(new_run())
    lost = new_run()
    assert reconciler.requeue_due() == [lost.id]


def test_only_runs_past_the_grace_or_their_backoff_are_due(
        make_reconciler: ReconcilerMaker, lifecycle: Lifecycle, store: Store,
        queue: FakeQueue, new_run: NewRunMaker) -> None:
    young, old = new_run(), new_run()
    set_run(store, old.id, created_at=past(120))
    waiting, done_waiting = running(lifecycle, new_run()), running(lifecycle, new_run())
    for run, at in ((waiting, utcnow() + timedelta(hours=1)), (done_waiting, past(1))):
        assert lifecycle.finish(run.id, 1, Finish(RunStatus.QUEUED, exit_code=75,
                                                  error_code=ErrorCode.NONZERO_EXIT,
                                                  next_attempt_at=at))
    report = make_reconciler(grace_seconds=60).run_once()
    assert sorted(report.requeued) == sorted([old.id, done_waiting.id])
    assert young.id not in queue.enqueued and waiting.id not in queue.enqueued
    assert (done_waiting.id, 2) in queue.jobs  # its next attempt, not the one that failed


# Leftover containers --------------------------------------------------------------------

def test_leftover_containers_are_removed_and_the_live_one_kept(
        reconciler: Reconciler, lifecycle: Lifecycle, store: Store, sandbox: FakeSandbox,
        new_run: NewRunMaker) -> None:
    finished = running(lifecycle, new_run())
    assert lifecycle.finish(finished.id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0))
    live = running(lifecycle, new_run())
    assert lifecycle.finish(live.id, 1, Finish(RunStatus.QUEUED, exit_code=75,
                                               error_code=ErrorCode.NONZERO_EXIT))
    live = running(lifecycle, current(store, live.id), attempt=2)
    leftovers = [
        sandbox.add_container(run_id=finished.id, attempt=1),
        sandbox.add_container(run_id="0" * 36, attempt=1),  # a run this database lacks
        sandbox.add_container(run_id=live.id, attempt=1),  # the attempt before
    ]
    kept = [
        sandbox.add_container(run_id=live.id, attempt=2),  # the live attempt's own
        sandbox.add_container(run_id=finished.id, attempt=1, managed=False),  # not ours
        sandbox.add_container(run_id=finished.id, attempt=1, instance="another-runner"),
    ]
    report = reconciler.run_once()
    assert sorted(report.removed_containers) == sorted(leftovers)
    assert sorted(sandbox.removed) == sorted(leftovers)
    assert set(sandbox.containers) == set(kept)
    assert report.expired == []


def test_a_container_younger_than_the_grace_is_kept(make_reconciler: ReconcilerMaker,
                                                    sandbox: FakeSandbox) -> None:
    young = sandbox.add_container(run_id="0" * 36, attempt=1, created=time.time())
    old = sandbox.add_container(run_id="0" * 36, attempt=1, created=time.time() - 600)
    assert make_reconciler(grace_seconds=60).run_once().removed_containers == [old]
    assert young in sandbox.containers


# The lock and Redis ---------------------------------------------------------------------

def test_the_lock_held_elsewhere_skips_the_pass(reconciler: Reconciler,
                                                lifecycle: Lifecycle, store: Store,
                                                sandbox: FakeSandbox, queue: FakeQueue,
                                                new_run: NewRunMaker) -> None:
    expired, due = running(lifecycle, new_run()), new_run()
    set_run(store, expired.id, lease_expires_at=past(5))
    leftover = sandbox.add_container(run_id="0" * 36, attempt=1)
    queue.lock_holder = "another-worker"
    report = reconciler.run_once()
    assert report.skipped is True and not report
    assert current(store, expired.id).status is RunStatus.RUNNING
    assert queue.enqueued == [] and leftover in sandbox.containers
    assert queue.lock_holder == "another-worker" and queue.unlocked == []
    assert due.id not in queue.enqueued


def test_the_lock_is_released_after_a_pass(reconciler: Reconciler,
                                           queue: FakeQueue) -> None:
    report = reconciler.run_once()
    assert report.skipped is False
    assert queue.lock_holder is None and len(queue.unlocked) == 1


def test_with_redis_down_leases_and_containers_are_still_recovered(
        reconciler: Reconciler, lifecycle: Lifecycle, store: Store, sandbox: FakeSandbox,
        queue: FakeQueue, new_run: NewRunMaker) -> None:
    expired, due = running(lifecycle, new_run()), new_run()
    set_run(store, expired.id, lease_expires_at=past(5))
    leftover = sandbox.add_container(run_id="0" * 36, attempt=1)
    queue.down = True
    report = reconciler.run_once()
    assert report.skipped is False
    assert report.expired == [expired.id]
    assert report.removed_containers == [leftover]
    assert report.requeued == [] and queue.enqueued == []
    queue.down = False  # Redis is back: the next pass enqueues what is due
    assert sorted(reconciler.run_once().requeued) == sorted([due.id, expired.id])


def test_retention_deletes_one_batch_of_old_runs_per_pass(
        make_reconciler: ReconcilerMaker, lifecycle: Lifecycle, store: Store,
        new_run: NewRunMaker) -> None:
    ended = []
    for _ in range(3):
        run = running(lifecycle, new_run())
        assert lifecycle.finish(run.id, 1, Finish(RunStatus.SUCCEEDED))
        ended.append(run)
    set_run(store, ended[0].id, finished_at=past(3 * 86400))
    set_run(store, ended[1].id, finished_at=past(3 * 86400))
    kept = running(lifecycle, new_run())
    set_run(store, kept.id, started_at=past(9 * 86400))  # old, but still running
    assert make_reconciler().run_once().pruned == 0  # retention off by default
    reconciler = make_reconciler(retention_days=2, retention_batch=1)
    assert reconciler.run_once().pruned == 1
    assert reconciler.run_once().pruned == 1
    assert reconciler.run_once().pruned == 0
    assert [store.get_run(r.id) is None for r in ended] == [True, True, False]
    assert current(store, kept.id).status is RunStatus.RUNNING
