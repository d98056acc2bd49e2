"""The run state machine on a real migrated database (SQLite in RAM): the ALLOWED
table as every door enforces it, fencing by attempt, claims, slots, cancels and
run-end listeners."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import func, select, update

from runner.control.lifecycle import ALLOWED, ClaimStatus, Lifecycle, RunEnded
from runner.control.models import LogChunkRow, SlotRow
from runner.control.store import Store
from runner.domain import ErrorCode, Finish, Run, RunStatus, utcnow
from runner.errors import ConflictError, NotFoundError
from tests.unit.conftest import NewRunMaker, past, set_run

Q, R = RunStatus.QUEUED, RunStatus.RUNNING
LEASE = 60.0
PAIRS = [(source, target) for source in RunStatus for target in RunStatus]


def claim(lifecycle: Lifecycle, run: Run, **options: Any) -> Run:
    """Claim the run's next attempt, which must win."""
    got = lifecycle.claim(run.id, attempt=run.attempt + 1, worker_id="w",
                          lease_seconds=LEASE, **options)
    assert got.status is ClaimStatus.CLAIMED, got
    assert got.run is not None
    return got.run


def current(store: Store, run_id: str) -> Run:
    run = store.get_run(run_id)
    assert run is not None
    return run


def finish_as(target: RunStatus, **fields: Any) -> Finish:
    code = {RunStatus.SUCCEEDED: None, RunStatus.CANCELED: ErrorCode.CANCELED,
            RunStatus.TIMED_OUT: ErrorCode.TIMEOUT}.get(target, ErrorCode.NONZERO_EXIT)
    values: dict[str, Any] = {"error_code": code, "exit_code": 0 if code is None else 1,
                              "error_message": None if code is None else "it failed"}
    values.update(fields)
    return Finish(target, **values)


def drive_into(source: RunStatus, lifecycle: Lifecycle, new_run: NewRunMaker) -> Run:
    """A run in `source`, brought there through the real API only."""
    run = new_run()
    if source is Q:
        return run
    if source in (RunStatus.CANCELED, RunStatus.DEAD_LETTER):
        assert lifecycle.end_queued(run.id, source, error_code=ErrorCode.CANCELED,
                                    message="ended before it started", stage="queue")
        return current(lifecycle.store, run.id)
    running = claim(lifecycle, run)
    if source is not R:
        assert lifecycle.finish(run.id, running.attempt, finish_as(source))
    return current(lifecycle.store, run.id)


def attempt_transition(lifecycle: Lifecycle, run: Run, target: RunStatus) -> bool:
    """Ask for `target` through the door a caller would use from the run's status."""
    if target is R:
        return lifecycle.claim(run.id, attempt=run.attempt + 1, worker_id="w2",
                               lease_seconds=LEASE).status is ClaimStatus.CLAIMED
    if run.status is Q:
        return lifecycle.end_queued(run.id, target, error_code=ErrorCode.CANCELED,
                                    message="ended", stage="queue")
    return lifecycle.finish(run.id, run.attempt, finish_as(target))


def every_door(lifecycle: Lifecycle, run: Run, target: RunStatus) -> list[object]:
    """Try each way that could write `target`; what each answered."""
    answers: list[object] = []
    if target is R:
        answers.append(lifecycle.claim(run.id, attempt=run.attempt + 1, worker_id="w2",
                                       lease_seconds=LEASE).status)
    answers += [
        lifecycle.end_queued(run.id, target, error_code=ErrorCode.CANCELED, message="ended",
                             stage="queue"),
        lifecycle.finish(run.id, run.attempt, finish_as(target)),
        lifecycle.finish(run.id, run.attempt, finish_as(target), only_if_lease_expired=True),
    ]
    return answers


def test_the_table_covers_every_status() -> None:
    assert set(ALLOWED) == set(RunStatus)
    assert all(not ALLOWED[s] for s in RunStatus if s.terminal)


@pytest.mark.parametrize(("source", "target"), [p for p in PAIRS if p[1] in ALLOWED[p[0]]],
                         ids=lambda s: s.value)
def test_allowed_transition_happens(source: RunStatus, target: RunStatus,
                                    lifecycle: Lifecycle, store: Store,
                                    new_run: NewRunMaker) -> None:
    run = drive_into(source, lifecycle, new_run)
    assert run.status is source
    assert attempt_transition(lifecycle, run, target) is True
    after = current(store, run.id)
    assert after.status is target
    if target.terminal:
        assert after.finished_at is not None
        assert after.lease_expires_at is None
    if target is R:
        assert after.attempt == run.attempt + 1
        assert after.lease_expires_at is not None
        assert [a["number"] for a in store.attempts(run.id)] == list(range(1, after.attempt + 1))


@pytest.mark.parametrize(("source", "target"),
                         [p for p in PAIRS if p[1] not in ALLOWED[p[0]]],
                         ids=lambda s: s.value)
def test_refused_transition_changes_nothing(source: RunStatus, target: RunStatus,
                                            lifecycle: Lifecycle, store: Store,
                                            new_run: NewRunMaker,
                                            events: list[RunEnded]) -> None:
    run = drive_into(source, lifecycle, new_run)
    before, attempts, told = current(store, run.id), store.attempts(run.id), list(events)
    answers = every_door(lifecycle, run, target)
    assert all(a in (False, ClaimStatus.GONE) for a in answers), answers
    assert current(store, run.id) == before
    assert store.attempts(run.id) == attempts
    assert events == told


# Fencing by attempt ------------------------------------------------------------------

def second_attempt(lifecycle: Lifecycle, new_run: NewRunMaker) -> Run:
    """A run whose attempt 1 was retried and whose attempt 2 is running."""
    run = new_run()
    first = claim(lifecycle, run)
    assert lifecycle.finish(run.id, 1, Finish(Q, exit_code=75,
                                              error_code=ErrorCode.NONZERO_EXIT))
    return claim(lifecycle, current(lifecycle.store, first.id))


def test_a_stale_attempt_cannot_finish(lifecycle: Lifecycle, store: Store,
                                       new_run: NewRunMaker) -> None:
    run = second_attempt(lifecycle, new_run)
    before = current(store, run.id)
    assert lifecycle.finish(run.id, 1, finish_as(RunStatus.SUCCEEDED)) is False
    assert current(store, run.id) == before
    assert lifecycle.finish(run.id, 2, finish_as(RunStatus.SUCCEEDED)) is True  # the live one
    assert current(store, run.id).status is RunStatus.SUCCEEDED


def test_a_stale_attempt_cannot_renew_the_lease(lifecycle: Lifecycle, store: Store,
                                                new_run: NewRunMaker) -> None:
    run = second_attempt(lifecycle, new_run)
    expired = past(5)
    set_run(store, run.id, lease_expires_at=expired)
    beat = lifecycle.heartbeat(run.id, 1, lease_seconds=LEASE)
    assert beat.owned is False
    assert current(store, run.id).lease_expires_at == expired
    live = lifecycle.heartbeat(run.id, 2, lease_seconds=LEASE)
    assert live.owned is True and live.cancel_requested is False
    renewed = current(store, run.id).lease_expires_at
    assert renewed is not None and renewed > utcnow() + timedelta(seconds=LEASE / 2)


def test_a_stale_attempt_cannot_append_output(lifecycle: Lifecycle, store: Store,
                                              new_run: NewRunMaker) -> None:
    run = second_attempt(lifecycle, new_run)
    store.append_log(run.id, 1, offset=0, data=b"late\n")
    assert store.read_logs(run.id) == b""
    store.append_log(run.id, 2, offset=0, data=b"live\n")
    assert store.read_logs(run.id) == b"live\n"


def test_an_ended_run_takes_no_more_output(lifecycle: Lifecycle, store: Store,
                                           new_run: NewRunMaker) -> None:
    run = claim(lifecycle, new_run())
    store.append_log(run.id, 1, offset=0, data=b"one\n")
    assert lifecycle.finish(run.id, 1, finish_as(RunStatus.SUCCEEDED))
    store.append_log(run.id, 1, offset=4, data=b"two\n")
    assert store.read_logs(run.id) == b"one\n"
    assert current(store, run.id).log_bytes == 4  # brought up to date by the finish


# Claims ------------------------------------------------------------------------------

def test_only_one_claim_per_attempt(lifecycle: Lifecycle, store: Store,
                                    new_run: NewRunMaker) -> None:
    run = new_run()
    first = lifecycle.claim(run.id, attempt=1, worker_id="a", lease_seconds=LEASE)
    second = lifecycle.claim(run.id, attempt=1, worker_id="b", lease_seconds=LEASE)
    assert first.status is ClaimStatus.CLAIMED
    assert second.status is ClaimStatus.GONE
    assert current(store, run.id).worker_id == "a"
    assert len(store.attempts(run.id)) == 1


def test_a_stale_copy_cannot_win_a_claim_twice(lifecycle: Lifecycle, store: Store,
                                               new_run: NewRunMaker) -> None:
    """A job delivered twice, both read the queued run: the UPDATE decides, and the
    loser frees only the slot it took itself."""
    run = new_run()
    claim(lifecycle, run, max_concurrency=2, known=run)
    lost = lifecycle.claim(run.id, attempt=1, worker_id="b", lease_seconds=LEASE,
                           max_concurrency=2, known=run)
    assert lost.status is ClaimStatus.GONE
    assert current(store, run.id).worker_id == "w"
    with store.session() as session:
        slots = session.execute(select(SlotRow.slot, SlotRow.run_id)).all()
    assert slots == [(0, run.id)]


def test_claim_of_a_wrong_attempt_or_unknown_run_is_gone(lifecycle: Lifecycle,
                                                         new_run: NewRunMaker) -> None:
    run = new_run()
    assert lifecycle.claim(run.id, attempt=2, worker_id="w",
                           lease_seconds=LEASE).status is ClaimStatus.GONE
    assert lifecycle.claim("0" * 36, attempt=1, worker_id="w",
                           lease_seconds=LEASE).status is ClaimStatus.GONE


def test_a_run_waiting_out_its_backoff_is_not_due(lifecycle: Lifecycle, store: Store,
                                                  new_run: NewRunMaker) -> None:
    run = claim(lifecycle, new_run())
    later = utcnow() + timedelta(hours=1)
    assert lifecycle.finish(run.id, 1, Finish(Q, exit_code=75,
                                              error_code=ErrorCode.NONZERO_EXIT,
                                              next_attempt_at=later))
    got = lifecycle.claim(run.id, attempt=2, worker_id="w", lease_seconds=LEASE)
    assert got.status is ClaimStatus.NOT_DUE
    assert got.retry_at == later
    assert current(store, run.id).status is Q
    set_run(store, run.id, next_attempt_at=past(1))  # the backoff is over
    assert claim(lifecycle, current(store, run.id)).attempt == 2


def slot_count(store: Store) -> int:
    with store.session() as session:
        return int(session.scalar(select(func.count()).select_from(SlotRow)) or 0)


def due_ids(lifecycle: Lifecycle) -> set[str]:
    return {r.id for r in lifecycle.due_queued(older_than=utcnow() + timedelta(seconds=1))}


def test_max_concurrency_caps_running_attempts(lifecycle: Lifecycle, store: Store,
                                               new_run: NewRunMaker) -> None:
    first, second = new_run(), new_run()
    claim(lifecycle, first, max_concurrency=1)
    full = lifecycle.claim(second.id, attempt=1, worker_id="w", lease_seconds=LEASE,
                           max_concurrency=1)
    assert full.status is ClaimStatus.AT_CAPACITY
    waiting = current(store, second.id)
    assert waiting.status is Q and waiting.attempt == 0
    # Parked: not due, so the requeue pass does not enqueue it again and again.
    assert second.id not in due_ids(lifecycle)
    assert slot_count(store) == 1
    assert lifecycle.finish(first.id, 1, finish_as(RunStatus.SUCCEEDED))
    assert slot_count(store) == 0  # the finish frees its slot ...
    assert second.id in due_ids(lifecycle)  # ... and wakes the parked run
    claim(lifecycle, current(store, second.id), max_concurrency=1)
    assert slot_count(store) == 1


def test_a_saturated_processor_parks_without_a_failed_insert(
        lifecycle: Lifecycle, store: Store, new_run: NewRunMaker) -> None:
    """Regression: each claim at capacity cost `max_concurrency` failed INSERTs (an
    ERROR line each on PostgreSQL) about every second, per queued run."""
    for _ in range(3):
        claim(lifecycle, new_run(), max_concurrency=3)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sqlalchemy_event.listen(store.engine, "before_cursor_execute", seen)
    try:
        parked = [new_run() for _ in range(5)]
        for run in parked:
            got = lifecycle.claim(run.id, attempt=1, worker_id="w", lease_seconds=LEASE,
                                  max_concurrency=3)
            assert got.status is ClaimStatus.AT_CAPACITY
    finally:
        sqlalchemy_event.remove(store.engine, "before_cursor_execute", seen)
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) <= 3 * len(parked)  # at most a few tries each, none raising
    assert not due_ids(lifecycle) & {r.id for r in parked}


def test_each_freed_slot_wakes_the_longest_parked_run(lifecycle: Lifecycle, store: Store,
                                                      new_run: NewRunMaker) -> None:
    busy = [claim(lifecycle, new_run(), max_concurrency=2) for _ in range(2)]
    parked = []
    for _ in range(3):
        run = new_run()
        assert lifecycle.claim(run.id, attempt=1, worker_id="w", lease_seconds=LEASE,
                               max_concurrency=2).status is ClaimStatus.AT_CAPACITY
        parked.append(run)
    assert lifecycle.finish(busy[0].id, 1, finish_as(RunStatus.SUCCEEDED))
    assert due_ids(lifecycle) == {parked[0].id}
    assert lifecycle.finish(busy[1].id, 1, finish_as(RunStatus.FAILED))
    assert due_ids(lifecycle) == {parked[0].id, parked[1].id}
    assert lifecycle.wake_parked("echo", 5) == 1  # the reconciler's safety net
    assert due_ids(lifecycle) == {r.id for r in parked}


def test_stale_slots_are_released_but_live_ones_kept(lifecycle: Lifecycle, store: Store,
                                                     new_run: NewRunMaker) -> None:
    live = claim(lifecycle, new_run(), max_concurrency=5)
    dead = new_run()
    with store.session() as session:  # a worker died between taking a slot and claiming
        session.add(SlotRow(processor="echo", slot=4, run_id=dead.id, attempt=1,
                            taken_at=past(600)))
        session.add(SlotRow(processor="echo", slot=3, run_id=dead.id, attempt=1,
                            taken_at=utcnow()))  # a claim still in progress
    with store.session() as session:  # old, but its attempt is running: kept
        session.execute(update(SlotRow).where(SlotRow.run_id == live.id)
                        .values(taken_at=past(600)))
    assert lifecycle.release_stale_slots(older_than_seconds=60) == 1
    with store.session() as session:
        left = sorted(session.execute(select(SlotRow.slot, SlotRow.run_id)).all())
    assert left == [(0, live.id), (3, dead.id)]


def test_heartbeat_renews_and_reports_a_cancel(lifecycle: Lifecycle, store: Store,
                                               new_run: NewRunMaker) -> None:
    run = claim(lifecycle, new_run())
    set_run(store, run.id, lease_expires_at=utcnow() + timedelta(seconds=1))
    assert lifecycle.heartbeat(run.id, 1, lease_seconds=LEASE).cancel_requested is False
    lease = current(store, run.id).lease_expires_at
    assert lease is not None and lease > utcnow() + timedelta(seconds=LEASE / 2)
    lifecycle.cancel(run.id, tenant="t")
    beat = lifecycle.heartbeat(run.id, 1, lease_seconds=LEASE)
    assert beat.owned is True and beat.cancel_requested is True


# Cancels -------------------------------------------------------------------------------

def test_cancel_requested_while_running_wins_over_a_retry(lifecycle: Lifecycle,
                                                          store: Store, new_run: NewRunMaker,
                                                          events: list[RunEnded]) -> None:
    run = claim(lifecycle, new_run())
    requested = lifecycle.cancel(run.id, tenant="t")
    assert requested.status is R and requested.cancel_requested_at is not None
    assert lifecycle.finish(run.id, 1, Finish(Q, exit_code=75,
                                              error_code=ErrorCode.NONZERO_EXIT,
                                              error_message="retry me",
                                              next_attempt_at=utcnow()))
    ended = current(store, run.id)
    assert ended.status is RunStatus.CANCELED
    assert ended.error_code == ErrorCode.CANCELED
    assert ended.next_attempt_at is None and ended.finished_at is not None
    assert events == [RunEnded(run.id, RunStatus.CANCELED, 1, ErrorCode.CANCELED)]


def test_cancel_of_a_queued_run_ends_it_at_once(lifecycle: Lifecycle, store: Store,
                                                new_run: NewRunMaker,
                                                events: list[RunEnded]) -> None:
    run = new_run()
    canceled = lifecycle.cancel(run.id, tenant="t")
    assert canceled.status is RunStatus.CANCELED
    assert canceled.error_code == ErrorCode.CANCELED and canceled.finished_at is not None
    assert events == [RunEnded(run.id, RunStatus.CANCELED, None, ErrorCode.CANCELED.value)]
    assert lifecycle.claim(run.id, attempt=1, worker_id="w",
                           lease_seconds=LEASE).status is ClaimStatus.GONE


def test_a_second_cancel_of_a_running_run_keeps_the_first_request(
        lifecycle: Lifecycle, new_run: NewRunMaker) -> None:
    run = claim(lifecycle, new_run())
    first = lifecycle.cancel(run.id, tenant="t").cancel_requested_at
    assert first is not None
    assert lifecycle.cancel(run.id, tenant="t").cancel_requested_at == first


@pytest.mark.parametrize("ended", [s for s in RunStatus if s.terminal], ids=str)
def test_cancel_of_an_ended_run_is_a_conflict(ended: RunStatus, lifecycle: Lifecycle,
                                              store: Store, new_run: NewRunMaker) -> None:
    run = drive_into(ended, lifecycle, new_run)
    with pytest.raises(ConflictError):
        lifecycle.cancel(run.id, tenant="t")
    assert current(store, run.id) == run


def test_cancel_of_another_tenants_or_no_run_is_not_found(lifecycle: Lifecycle,
                                                          store: Store,
                                                          new_run: NewRunMaker) -> None:
    run = new_run()
    with pytest.raises(NotFoundError):
        lifecycle.cancel(run.id, tenant="someone-else")
    with pytest.raises(NotFoundError):
        lifecycle.cancel("0" * 36, tenant=None)
    assert current(store, run.id).status is Q


# Run-end listeners --------------------------------------------------------------------

@pytest.mark.parametrize("final", [s for s in RunStatus if s.terminal], ids=str)
def test_listeners_are_told_once_per_final_status(final: RunStatus, lifecycle: Lifecycle,
                                                  new_run: NewRunMaker,
                                                  events: list[RunEnded]) -> None:
    run = claim(lifecycle, new_run())
    outcome = finish_as(final)
    assert lifecycle.finish(run.id, 1, outcome)
    assert lifecycle.finish(run.id, 1, outcome) is False  # a repeat is refused, untold
    assert events == [RunEnded(run.id, final, 1, outcome.error_code)]


def test_listeners_are_not_told_of_a_retry(lifecycle: Lifecycle, store: Store,
                                           new_run: NewRunMaker,
                                           events: list[RunEnded]) -> None:
    run = claim(lifecycle, new_run())
    assert lifecycle.finish(run.id, 1, Finish(Q, exit_code=75,
                                              error_code=ErrorCode.NONZERO_EXIT))
    assert current(store, run.id).status is Q
    assert events == []


def test_a_failing_listener_does_not_undo_the_write(store: Store,
                                                    new_run: NewRunMaker) -> None:
    told: list[RunEnded] = []

    def broken(_event: RunEnded) -> None:
        raise RuntimeError("the notice bus is down")

    lifecycle = Lifecycle(store, listeners=[broken, told.append])
    run = claim(lifecycle, new_run())
    assert lifecycle.finish(run.id, 1, finish_as(RunStatus.SUCCEEDED)) is True
    assert current(store, run.id).status is RunStatus.SUCCEEDED
    assert told == [RunEnded(run.id, RunStatus.SUCCEEDED, 1, None)]  # the next still hears
    queued = new_run()
    assert lifecycle.cancel(queued.id, tenant="t").status is RunStatus.CANCELED


# Fencing on the lease ------------------------------------------------------------------

def test_only_if_lease_expired_refuses_while_the_lease_is_live(lifecycle: Lifecycle,
                                                               store: Store,
                                                               new_run: NewRunMaker) -> None:
    run = claim(lifecycle, new_run())
    lost = Finish(Q, error_code=ErrorCode.WORKER_LOST, error_stage="lease")
    assert lifecycle.finish(run.id, 1, lost, only_if_lease_expired=True) is False
    assert current(store, run.id).status is R
    set_run(store, run.id, lease_expires_at=past(1))
    assert lifecycle.finish(run.id, 1, lost, only_if_lease_expired=True) is True
    after = current(store, run.id)
    assert after.status is Q and after.error_code == ErrorCode.WORKER_LOST
    assert store.attempts(run.id)[0]["status"] == RunStatus.FAILED.value


def test_expired_leases_and_due_runs_are_found(lifecycle: Lifecycle, store: Store,
                                               new_run: NewRunMaker) -> None:
    live, expired = claim(lifecycle, new_run()), claim(lifecycle, new_run())
    set_run(store, expired.id, lease_expires_at=past(1))
    assert [r.id for r in lifecycle.expired_leases()] == [expired.id]
    fresh, old, backing_off = new_run(), new_run(), claim(lifecycle, new_run())
    set_run(store, old.id, created_at=past(120))
    assert lifecycle.finish(backing_off.id, 1, Finish(
        Q, error_code=ErrorCode.WORKER_LOST, next_attempt_at=utcnow() + timedelta(hours=1)))
    due = {r.id for r in lifecycle.due_queued(older_than=past(60))}
    assert due == {old.id}
    assert fresh.id not in due and live.id not in due


def test_output_chunks_are_stored_in_order(lifecycle: Lifecycle, store: Store,
                                           new_run: NewRunMaker) -> None:
    run = claim(lifecycle, new_run())
    store.append_log(run.id, 1, offset=0, data=b"ab")
    store.append_log(run.id, 1, offset=2, data=b"cd")
    assert store.read_logs(run.id) == b"abcd"
    assert store.read_logs(run.id, offset=1, limit=2) == b"bc"
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(LogChunkRow)) == 2


# Regression: the retry write once lacked `cancel_requested_at IS NULL`, so a cancel
# accepted between finish's read and its UPDATE stranded the run queued for ever.
def test_a_cancel_landing_during_a_retry_write_still_wins(lifecycle: Lifecycle,
                                                          store: Store,
                                                          new_run: NewRunMaker,
                                                          events: list[RunEnded]) -> None:
    run = claim(lifecycle, new_run())
    accepted: list[Run] = []

    def cancel_just_before_the_write(_conn: Any, _cursor: Any, statement: str,
                                     *_args: Any) -> None:
        # The API's cancel, landing between finish's read of the cancel flag and its
        # UPDATE (no lock is held yet: SQLite begins the write lazily).
        if not accepted and statement.lstrip().upper().startswith("UPDATE RUNS SET STATUS"):
            accepted.append(lifecycle.cancel(run.id, tenant="t"))

    sqlalchemy_event.listen(store.engine, "before_cursor_execute",
                            cancel_just_before_the_write)
    try:
        assert lifecycle.finish(run.id, 1, Finish(Q, exit_code=75,
                                                  error_code=ErrorCode.NONZERO_EXIT))
    finally:
        sqlalchemy_event.remove(store.engine, "before_cursor_execute",
                                cancel_just_before_the_write)
    assert accepted and accepted[0].cancel_requested_at is not None  # the API said yes
    after = current(store, run.id)
    assert after.status is RunStatus.CANCELED, (
        f"stranded: {after.status} with cancel_requested_at={after.cancel_requested_at}; "
        f"claim says {lifecycle.claim(run.id, attempt=2, worker_id='w', lease_seconds=LEASE)}")
    assert [e.status for e in events] == [RunStatus.CANCELED]
