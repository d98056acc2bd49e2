"""The run state machine: every change of a run's status goes through this module.

Each change is one conditional UPDATE that names the states it may leave, so an
invalid transition changes nothing and is logged, and concurrent actors (workers,
the reconciler, the API) cannot both win. Writes of an attempt are fenced by its
attempt number: a stalled worker's late write matches no row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

import structlog
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from runner.control.logstore import captured_bytes
from runner.control.models import AttemptRow, LogChunkRow, RunRow, SlotRow
from runner.control.outbox import record_end
from runner.control.rows import run_from_row
from runner.control.store import Store, add_artifacts, rows_changed
from runner.domain import ErrorCode, Finish, Run, RunStatus, utcnow
from runner.errors import ConflictError, NotFoundError

log = structlog.get_logger(__name__)

Q, R = RunStatus.QUEUED, RunStatus.RUNNING
ALLOWED: dict[RunStatus, frozenset[RunStatus]] = {
    Q: frozenset({R, RunStatus.CANCELED, RunStatus.DEAD_LETTER}),
    R: frozenset({Q, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.TIMED_OUT,
                  RunStatus.CANCELED, RunStatus.DEAD_LETTER}),
    **{s: frozenset() for s in RunStatus if s.terminal},
}


def _transitioned(run_id: str, attempt: int | None, source: RunStatus, target: RunStatus,
                  **fields: Any) -> None:
    """The one log line of each status change that happened."""
    log.info("run.transition", run_id=run_id, attempt=attempt, **{"from": source.value},
             to=target.value, **{k: v for k, v in fields.items() if v is not None})


def _canceled_instead(outcome: Finish) -> Finish:
    """The end of an attempt whose retry lost to a cancel requested while it ran."""
    return Finish(RunStatus.CANCELED, exit_code=outcome.exit_code,
                  error_code=ErrorCode.CANCELED, error_stage=outcome.error_stage,
                  error_message=f"canceled ({outcome.error_message})",
                  log_bytes=outcome.log_bytes, log_truncated=outcome.log_truncated,
                  artifacts=outcome.artifacts)


def sources(target: RunStatus) -> list[str]:
    """The states a run may be in to move to `target`."""
    return [s.value for s, targets in ALLOWED.items() if target in targets]


# The statements every attempt runs, built once with bound parameters (named p_*):
# executing a prebuilt statement skips building it and computing its cache key, a
# few tenths of a millisecond of CPU each, on the path of every run.
_CLAIM = update(RunRow).where(
    RunRow.id == bindparam("p_run"), RunRow.status == Q.value,
    RunRow.attempt == bindparam("p_previous"), RunRow.cancel_requested_at.is_(None),
).values(status=R.value, attempt=bindparam("p_attempt"), worker_id=bindparam("p_worker"),
         started_at=bindparam("p_now"), parked_at=None, lease_expires_at=bindparam("p_lease"),
         next_attempt_at=None, error_code=None, error_message=None, error_stage=None,
         exit_code=None, finished_at=None)
_NEW_ATTEMPT = insert(AttemptRow).values(
    run_id=bindparam("p_run"), number=bindparam("p_attempt"), worker_id=bindparam("p_worker"),
    host_id=bindparam("p_host"), status=R.value, started_at=bindparam("p_now"))
_RENEW = update(RunRow).where(
    RunRow.id == bindparam("p_run"), RunRow.attempt == bindparam("p_attempt"),
    RunRow.status == R.value,
).values(lease_expires_at=bindparam("p_lease")).returning(RunRow.cancel_requested_at)
# The attempt row's end; a tail's container record fills in what it knows.
_END_ATTEMPT = update(AttemptRow).where(
    AttemptRow.run_id == bindparam("p_run"), AttemptRow.number == bindparam("p_attempt"),
).values(status=bindparam("p_status"), exit_code=bindparam("p_exit"),
         error_code=bindparam("p_error"), error_message=bindparam("p_message"),
         error_stage=bindparam("p_stage"), log_bytes=bindparam("p_log_bytes"),
         finished_at=bindparam("p_now"),
         container_id=func.coalesce(bindparam("p_container", type_=AttemptRow.container_id.type),
                                    AttemptRow.container_id),
         image_id=func.coalesce(bindparam("p_image", type_=AttemptRow.image_id.type),
                                AttemptRow.image_id),
         # A missing receipt is SQL NULL here, not JSON null, so it keeps one written
         # while the container ran.
         provenance=func.coalesce(bindparam("p_provenance", type_=JSON(none_as_null=True)),
                                  AttemptRow.provenance))
_TAIL_CHUNK = insert(LogChunkRow).values(
    run_id=bindparam("p_run"), attempt=bindparam("p_attempt"),
    offset=bindparam("p_offset"), data=bindparam("p_data"))
_FREE_SLOT = delete(SlotRow).where(SlotRow.run_id == bindparam("p_run"),
                                   SlotRow.attempt == bindparam("p_attempt"))

# The requeue pass's question, every half second in every worker.
_DUE = select(RunRow).where(
    RunRow.status == Q.value, RunRow.cancel_requested_at.is_(None), RunRow.parked_at.is_(None),
    or_(and_(RunRow.next_attempt_at.is_(None), RunRow.created_at < bindparam("p_older")),
        RunRow.next_attempt_at <= bindparam("p_now")),
).order_by(RunRow.next_attempt_at.is_(None), RunRow.next_attempt_at,
           RunRow.id).limit(bindparam("p_limit"))


_DUE_KEYS = _DUE.with_only_columns(RunRow.id, RunRow.attempt)


@functools.cache
def _end_statement(target: RunStatus, lease_expired: bool) -> Update:
    """The fenced UPDATE of an attempt's end as `target` (one per target and fence):
    it names the states the run may leave and the attempt, and, for a retry, no
    pending cancel; for the reconciler's take-back, a lease that has expired."""
    conditions = [RunRow.id == bindparam("p_run"), RunRow.attempt == bindparam("p_attempt"),
                  RunRow.status.in_(sources(target)), RunRow.status == R.value]
    if target is Q:
        # A retry is only written while no cancel is pending; otherwise the run ends
        # canceled (`Lifecycle.finish`).
        conditions.append(RunRow.cancel_requested_at.is_(None))
    if lease_expired:
        conditions.append(or_(RunRow.lease_expires_at.is_(None),
                              RunRow.lease_expires_at < bindparam("p_now")))
    # `captured_bytes` compares the run id with its argument: here, the bound id.
    stored = captured_bytes(cast(str, bindparam("p_run"))).scalar_subquery()
    return update(RunRow).where(*conditions).values(
        status=target.value, exit_code=bindparam("p_exit"), error_code=bindparam("p_error"),
        error_message=bindparam("p_message"), error_stage=bindparam("p_stage"),
        result=bindparam("p_result"),
        log_truncated=RunRow.log_truncated | bindparam("p_truncated", type_=Boolean),
        lease_expires_at=None, next_attempt_at=bindparam("p_next"),
        finished_at=bindparam("p_finished"),
        log_bytes=stored + bindparam("p_tail_bytes", type_=BigInteger),
    ).returning(RunRow.tenant, RunRow.processor, RunRow.webhook_url)


class ClaimStatus(StrEnum):
    CLAIMED = "claimed"
    NOT_DUE = "not_due"          # still waiting out its backoff
    AT_CAPACITY = "at_capacity"  # the processor's max_concurrency is reached
    GONE = "gone"                # another attempt, a cancel, or an end got there first


@dataclass(frozen=True)
class Claim:
    status: ClaimStatus
    run: Run | None = None
    retry_at: datetime | None = None


@dataclass(frozen=True)
class Heartbeat:
    owned: bool
    cancel_requested: bool


@dataclass(frozen=True)
class AttemptTail:
    """What an attempt still holds when it ends: output not yet stored (from byte
    `log_offset` of the run's log) and what it ran (container, image, provenance
    receipt), not yet recorded. Written in the transaction of the attempt's end, after
    its fenced UPDATE: a short run's output and receipt cost no writes of their own,
    and a fenced-off end writes none of it."""

    log_offset: int = 0
    log_data: bytes = b""
    container_id: str | None = None
    image_id: str | None = None
    provenance: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunEnded:
    """A run reached a final status (told to every run-end listener, once)."""

    run_id: str
    status: RunStatus
    attempt: int | None
    error_code: str | None


RunEndListener = Callable[[RunEnded], None]


class Lifecycle:
    """Status changes of runs, on top of a `Store`.

    `listeners` hear about every final status this lifecycle writes, whoever asks for
    it (a worker, the reconciler, a cancel from the API or `runner ops`): the Redis
    run-end notice, the webhook sender's wake. A listener that fails is logged and
    never undoes or blocks the write. A final status's webhook delivery is no
    listener: it is written in the status change's own transaction (`record_end`).
    """

    def __init__(self, store: Store, listeners: Iterable[RunEndListener] = ()) -> None:
        self.store = store
        self.listeners: list[RunEndListener] = list(listeners)

    def _ended(self, event: RunEnded) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener never undoes a recorded end
                log.exception("run_end_listener_failed", run_id=event.run_id)

    def _refused(self, session: Session, run_id: str, target: RunStatus,
                 attempt: int | None = None) -> None:
        current = session.get(RunRow, run_id)
        log.info("transition_refused", run_id=run_id, target=target, attempt=attempt,
                 current=current.status if current else "missing",
                 current_attempt=current.attempt if current else None)

    def claim(self, run_id: str, *, attempt: int, worker_id: str, lease_seconds: float,
              max_concurrency: int | None = None, known: Run | None = None,
              host_id: str | None = None) -> Claim:
        """Start attempt `attempt` of a queued run; only one claim can ever win it.

        `known` is the run as just read by the caller: it spares a read here (the
        UPDATE below re-checks every condition atomically, so a stale copy can only
        make the claim lose, never win twice).
        """
        now = utcnow()
        if known is None:
            known = self.store.get_run(run_id)
        if (known is None or known.status is not Q or known.attempt != attempt - 1
                or known.cancel_requested_at is not None):
            return Claim(ClaimStatus.GONE)
        due = known.next_attempt_at
        if due is not None and due > now:
            return Claim(ClaimStatus.NOT_DUE, retry_at=due)
        processor = known.processor
        slot = None
        if max_concurrency is not None and (slot := self._take_slot(
                run_id, processor=processor, attempt=attempt, cap=max_concurrency)) is None:
            # Parked, not retried on a timer: the release of a slot wakes it (and a
            # reconciler pass wakes parked runs of a processor with free slots, should
            # that wake be lost).
            with self.store.session() as session:
                session.execute(update(RunRow).where(
                    RunRow.id == run_id, RunRow.status == Q.value,
                    RunRow.attempt == attempt - 1).values(parked_at=now)
                    .execution_options(synchronize_session=False))
            log.info("run_parked", run_id=run_id, processor=processor, cap=max_concurrency)
            return Claim(ClaimStatus.AT_CAPACITY)
        if max_concurrency is not None:
            # The attempt starts once it holds a slot: a start time read before the slot
            # was taken could precede the finish of the run whose slot it inherited.
            now = utcnow()
        params = {"p_run": run_id, "p_previous": attempt - 1, "p_attempt": attempt,
                  "p_worker": worker_id, "p_now": now, "p_host": host_id or None,
                  "p_lease": now + timedelta(seconds=lease_seconds)}
        with self.store.session() as session:
            connection = session.connection()
            if connection.execute(_CLAIM, params).rowcount != 1:
                # Lost to another claim of the same attempt (a job delivered twice),
                # which holds a slot of its own under the same run and attempt: free
                # only the slot this claim took, never the winner's.
                if slot is not None:
                    session.execute(delete(SlotRow).where(
                        SlotRow.processor == processor, SlotRow.slot == slot,
                        SlotRow.run_id == run_id, SlotRow.attempt == attempt))
                return Claim(ClaimStatus.GONE)
            connection.execute(_NEW_ATTEMPT, params)
        # What the UPDATE wrote, without reading the row back.
        claimed = replace(known, status=R, attempt=attempt, worker_id=worker_id,
                          started_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds),
                          next_attempt_at=None, error_code=None, error_message=None,
                          error_stage=None, exit_code=None, finished_at=None)
        _transitioned(run_id, attempt, Q, R, worker_id=worker_id)
        return Claim(ClaimStatus.CLAIMED, run=claimed)

    def _take_slot(self, run_id: str, *, processor: str, attempt: int, cap: int
                   ) -> int | None:
        """Hold one of the processor's `cap` slots: its number, or None if all are held.

        One INSERT ... SELECT of the lowest free slot number, ON CONFLICT DO NOTHING:
        at capacity it inserts nothing and raises nothing (no error line on the
        server). Two claims picking the same free number at once: one wins, the other
        looks again.
        """
        numbers = union_all(*[select(literal(n).label("n")) for n in range(cap)]).subquery()
        held = select(SlotRow.slot).where(SlotRow.processor == processor)
        pick = (select(literal(processor), numbers.c.n, literal(run_id), literal(attempt),
                       literal(utcnow(), DateTime(timezone=True)))
                .where(numbers.c.n.not_in(held)).order_by(numbers.c.n).limit(1))
        insert = (sqlite_insert if self.store.engine.dialect.name == "sqlite" else pg_insert)
        statement = (insert(SlotRow)
                     .from_select(["processor", "slot", "run_id", "attempt", "taken_at"], pick)
                     .on_conflict_do_nothing().returning(SlotRow.slot))
        for _ in range(3):
            with self.store.session() as session:
                slot = session.scalar(statement)
                if slot is not None:
                    return int(slot)
                count = session.scalar(select(func.count()).select_from(SlotRow)
                                       .where(SlotRow.processor == processor)) or 0
            if count >= cap:
                return None
        return None

    def wake_parked(self, processor: str, count: int = 1) -> int:
        """Make the `count` longest-parked runs of `processor` due again (a slot freed)."""
        if count <= 0:
            return 0
        with self.store.session() as session:
            return self._wake(session, processor, count)

    @staticmethod
    def _wake(session: Session, processor: str, count: int) -> int:
        oldest = (select(RunRow.id).where(RunRow.processor == processor,
                                          RunRow.status == Q.value,
                                          RunRow.parked_at.is_not(None))
                  .order_by(RunRow.parked_at, RunRow.id).limit(count))
        woken = update(RunRow).where(RunRow.id.in_(oldest)).values(
            parked_at=None, next_attempt_at=utcnow())
        return rows_changed(session, woken.execution_options(synchronize_session=False))

    def slots_held(self) -> dict[str, int]:
        """Slots held per processor (the reconciler wakes parked runs where some are free)."""
        with self.store.session() as session:
            return {p: int(n) for p, n in session.execute(
                select(SlotRow.processor, func.count()).group_by(SlotRow.processor))}

    def release_stale_slots(self, *, older_than_seconds: float = 60) -> int:
        """Free slots whose attempt is not running (a worker died between two steps).

        Only old slots: a slot taken a moment ago belongs to a claim still in progress
        whose run is not marked running yet.
        """
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        with self.store.session() as session:
            live = select(RunRow.id).where(RunRow.status == R.value,
                                           RunRow.id == SlotRow.run_id,
                                           RunRow.attempt == SlotRow.attempt)
            query = delete(SlotRow).where(~live.exists(), SlotRow.taken_at < cutoff)
            return rows_changed(session, query.execution_options(synchronize_session=False))

    def heartbeat(self, run_id: str, attempt: int, *, lease_seconds: float) -> Heartbeat:
        """Renew the attempt's lease; tells whether it is still ours and if cancel came."""
        now = utcnow()
        with self.store.session() as session:
            renewed = session.connection().execute(_RENEW, {
                "p_run": run_id, "p_attempt": attempt,
                "p_lease": now + timedelta(seconds=lease_seconds)}).first()
        if renewed is None:
            return Heartbeat(owned=False, cancel_requested=False)
        return Heartbeat(owned=True, cancel_requested=renewed[0] is not None)

    def finish(self, run_id: str, attempt: int, outcome: Finish, *,
               only_if_lease_expired: bool = False, tail: AttemptTail | None = None) -> bool:
        """Record how attempt `attempt` ended; False (and nothing changed) if it lost the run.

        `tail` (the worker's own end only) is written with the end, in its transaction.
        A retry refused because a cancel arrived mid-attempt is written as `canceled`
        instead: a cancel always wins over a retry.
        """
        now = utcnow()
        terminal = outcome.status.terminal
        if not self._write_end(run_id, attempt, outcome, now, tail,
                               lease_expired=only_if_lease_expired):
            if outcome.status is Q and self._cancel_pending(run_id, attempt):
                return self.finish(run_id, attempt, _canceled_instead(outcome),
                                   only_if_lease_expired=only_if_lease_expired, tail=tail)
            with self.store.session() as session:
                self._refused(session, run_id, outcome.status, attempt=attempt)
            return False
        _transitioned(run_id, attempt, R, outcome.status, error_code=outcome.error_code,
                      next_attempt_at=outcome.next_attempt_at)
        if terminal:
            self._ended(RunEnded(run_id, outcome.status, attempt, outcome.error_code))
        return True

    def take_back(self, run_id: str, attempt: int, outcome: Finish, *,
                  hold_until: datetime) -> bool:
        """The reconciler's fence: end attempt `attempt` of a run whose lease expired,
        in one conditional write, before anything else is done to it.

        Once this returns True the attempt is no longer the worker's: its heartbeats
        answer "not owned" and its late writes match nothing. A retry is written held
        (`next_attempt_at = hold_until`), so no other worker starts it while the old
        container may still run; `release_hold` makes it due once that container is
        gone (and the hold lapses by itself if the reconciler dies in between). False:
        the lease was renewed meanwhile (the worker is alive) or the run moved on.
        """
        if outcome.status is Q:
            outcome = replace(outcome, next_attempt_at=hold_until)
        return self.finish(run_id, attempt, outcome, only_if_lease_expired=True)

    def release_hold(self, run_id: str, attempt: int, *, due_at: datetime | None) -> bool:
        """Make a run taken back by `take_back` due at `due_at` (its retry backoff)."""
        with self.store.session() as session:
            return rows_changed(session, update(RunRow).where(
                RunRow.id == run_id, RunRow.attempt == attempt, RunRow.status == Q.value,
            ).values(next_attempt_at=due_at)
              .execution_options(synchronize_session=False)) == 1

    def _write_end(self, run_id: str, attempt: int, outcome: Finish, now: datetime,
                   tail: AttemptTail | None, *, lease_expired: bool) -> bool:
        """The conditional write of an attempt's end, with its attempt row, slot and
        tail. The tail's chunk goes in after the fenced UPDATE has won (it holds the
        run's row), so only an end that is written brings its output with it."""
        tail = tail or AttemptTail()
        params = {"p_run": run_id, "p_attempt": attempt, "p_now": now,
                  "p_exit": outcome.exit_code, "p_error": outcome.error_code,
                  "p_message": outcome.error_message, "p_stage": outcome.error_stage,
                  "p_result": outcome.result, "p_truncated": outcome.log_truncated,
                  "p_next": outcome.next_attempt_at,
                  "p_finished": now if outcome.status.terminal else None,
                  "p_tail_bytes": len(tail.log_data), "p_offset": tail.log_offset,
                  "p_data": tail.log_data, "p_log_bytes": outcome.log_bytes,
                  "p_status": (RunStatus.FAILED if outcome.status is Q
                               else outcome.status).value,
                  "p_container": tail.container_id, "p_image": tail.image_id,
                  "p_provenance": tail.provenance}
        with self.store.session() as session:
            connection = session.connection()
            won = connection.execute(_end_statement(outcome.status, lease_expired),
                                     params).first()
            if won is None:
                return False
            tenant, processor, webhook_url = won
            if tail.log_data:
                connection.execute(_TAIL_CHUNK, params)
            if outcome.status.terminal and webhook_url is not None:
                record_end(session, run_id, now)
            connection.execute(_END_ATTEMPT, params)
            if outcome.artifacts:
                add_artifacts(session, run_id, attempt, tenant or "", outcome.artifacts)
            freed = connection.execute(_FREE_SLOT, params).rowcount
            if freed:
                self._wake(session, processor, freed)
        return True

    def _cancel_pending(self, run_id: str, attempt: int) -> bool:
        """Attempt `attempt` is still running and a cancel was requested for it."""
        with self.store.session() as session:
            return session.scalar(select(RunRow.cancel_requested_at).where(
                RunRow.id == run_id, RunRow.attempt == attempt,
                RunRow.status == R.value)) is not None

    def end_queued(self, run_id: str, target: RunStatus, *, error_code: ErrorCode,
                   message: str, stage: str) -> bool:
        """End a run that never started (a cancel)."""
        now = utcnow()
        with self.store.session() as session:
            changed = rows_changed(session, update(RunRow).where(
                RunRow.id == run_id, RunRow.status == Q.value,
                RunRow.status.in_(sources(target)),
            ).values(status=target.value, error_code=error_code.value, error_message=message,
                     error_stage=stage, finished_at=now, next_attempt_at=None)
              .execution_options(synchronize_session=False))
            if changed != 1:
                self._refused(session, run_id, target)
                return False
            record_end(session, run_id, now)
        _transitioned(run_id, None, Q, target, error_code=error_code)
        self._ended(RunEnded(run_id, target, None, error_code.value))
        return True

    def cancel(self, run_id: str, *, tenant: str | None) -> Run:
        """Cancel a run: a queued one ends at once, a running one is stopped by its worker.

        Raises:
            NotFoundError: no such run for this tenant.
            ConflictError: the run has already ended.
        """
        run = self.store.get_run(run_id, tenant=tenant)
        if run is None:
            raise NotFoundError(f"no run {run_id}")
        if run.status.terminal:
            raise ConflictError(f"run {run_id} already ended as {run.status}",
                                status=run.status)
        if run.status is Q and self.end_queued(run_id, RunStatus.CANCELED,
                                               error_code=ErrorCode.CANCELED,
                                               message="canceled before it started",
                                               stage="queue"):
            log.info("run_canceled", run_id=run_id, was="queued")
        else:
            # Running (or it started a moment ago): its worker sees the request on its
            # next heartbeat and stops the container within the grace period.
            with self.store.session() as session:
                changed = rows_changed(session, update(RunRow).where(
                    RunRow.id == run_id, RunRow.status == R.value,
                    RunRow.cancel_requested_at.is_(None),
                ).values(cancel_requested_at=utcnow())
                  .execution_options(synchronize_session=False))
            if changed:
                log.info("run_cancel_requested", run_id=run_id)
        current = self.store.get_run(run_id)
        assert current is not None
        return current

    # Queries for the reconciler ------------------------------------------------

    def expired_leases(self, *, now: datetime | None = None) -> list[Run]:
        now = now or utcnow()
        with self.store.session() as session:
            rows = session.scalars(select(RunRow).where(
                RunRow.status == R.value,
                or_(RunRow.lease_expires_at.is_(None), RunRow.lease_expires_at < now)))
            return [run_from_row(r) for r in rows]

    def due_queued_keys(self, *, older_than: datetime, limit: int) -> list[tuple[str, int]]:
        """`due_queued`'s runs as (id, attempt) only, in the same order: cheap enough to
        go through a whole backlog of them."""
        with self.store.session() as session:
            rows = session.execute(_DUE_KEYS, {"p_older": older_than, "p_now": utcnow(),
                                               "p_limit": limit})
            return [(run_id, attempt) for run_id, attempt in rows]

    def due_queued(self, *, older_than: datetime, limit: int = 500) -> list[Run]:
        """Queued runs that should be in Redis by now: retries whose backoff is over,
        and first attempts older than `older_than` (lost on the way to Redis)."""
        with self.store.session() as session:
            rows = session.scalars(_DUE, {"p_older": older_than, "p_now": utcnow(),
                                          "p_limit": limit})
            return [run_from_row(r) for r in rows]
