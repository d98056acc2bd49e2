"""Reports for operators and metrics: the queries behind `runner ops` and `/metrics`.

`StoreReports` is a mixin of `Store` (it only needs `session()` and `engine`), so the
commands and the scrape ask the store named questions instead of writing SQL. Every
method answers with plain data (counts, ids, `Run` snapshots), never ORM rows.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Engine, Select, delete, func, select
from sqlalchemy.orm import Session

from runner.control.models import (
    ArtifactRow,
    AttemptRow,
    LogChunkRow,
    RunFileRow,
    RunRow,
    WebhookDeliveryRow,
)
from runner.control.rows import run_from_row
from runner.domain import Run, RunStatus

_TERMINAL = [s.value for s in RunStatus if s.terminal]


class HasSessions(Protocol):
    """What the reports need of the store they are mixed into."""

    engine: Engine

    def session(self) -> AbstractContextManager[Session]: ...


def _snapshots(rows: Iterable[RunRow]) -> list[Run]:
    """Frozen `Run` records of rows (read inside the session that loaded them)."""
    return [run_from_row(row) for row in rows]


def _chunks_of_runs_ended_before(cutoff: datetime, processor: str | None) -> ColumnElement[bool]:
    """Log chunks of runs in a terminal status that ended before `cutoff`."""
    ended = select(RunRow.id).where(RunRow.status.in_(_TERMINAL), RunRow.finished_at < cutoff)
    if processor:
        ended = ended.where(RunRow.processor == processor)
    return LogChunkRow.run_id.in_(ended)


def _tally(session: Session, chosen: ColumnElement[bool]) -> tuple[int, int]:
    """(chunks, bytes) of the log chunks `chosen` selects."""
    query: Select[Any] = select(func.count(),
                                func.coalesce(func.sum(func.length(LogChunkRow.data)), 0))
    chunks, size = session.execute(query.where(chosen)).one()
    return int(chunks), int(size)


class StoreReports:
    """Named read queries over runs and stored logs, plus the one operator prune."""

    # Runs by status --------------------------------------------------------------

    def count_parked(self: HasSessions, processor: str | None = None) -> int:
        """Queued runs parked until a slot of their processor frees (max_concurrency)."""
        query = select(func.count()).select_from(RunRow).where(
            RunRow.status == RunStatus.QUEUED.value, RunRow.parked_at.is_not(None))
        if processor is not None:
            query = query.where(RunRow.processor == processor)
        with self.session() as session:
            return int(session.scalar(query) or 0)

    def count_runs_by_status(self: HasSessions, *, statuses: Collection[str] | None = None,
                             processor: str | None = None) -> dict[str, int]:
        """Number of runs per status, only statuses that have runs (in database order).

        `statuses` and `processor` narrow what is counted: the /metrics gauge counts
        every run, `ops status` every status, `ops wait-idle` the active ones.
        """
        query = select(RunRow.status, func.count())
        if statuses is not None:
            query = query.where(RunRow.status.in_(list(statuses)))
        if processor:
            query = query.where(RunRow.processor == processor)
        with self.session() as session:
            rows = session.execute(query.group_by(RunRow.status)).all()
        return {status: int(count) for status, count in rows}

    def queued_by_queue(self: HasSessions) -> dict[str, int]:
        """Queued runs per queue (a tagged processor's runs are on their tag set's)."""
        with self.session() as session:
            rows = session.execute(select(RunRow.queue, func.count()).where(
                RunRow.status == RunStatus.QUEUED.value).group_by(RunRow.queue)).all()
        return {queue: int(count) for queue, count in rows}

    def queued_runs(self: HasSessions) -> list[Run]:
        """Every queued run (any order), for the backlog's size, age and breakdown."""
        with self.session() as session:
            return _snapshots(session.scalars(select(RunRow).where(
                RunRow.status == RunStatus.QUEUED.value)))

    def queued_run_ids(self: HasSessions, *, processor: str | None = None,
                       tenant: str | None = None) -> list[str]:
        """Ids of the queued runs of a processor and/or tenant (what a flood cancel ends)."""
        query = select(RunRow.id).where(RunRow.status == RunStatus.QUEUED.value)
        if processor:
            query = query.where(RunRow.processor == processor)
        if tenant:
            query = query.where(RunRow.tenant == tenant)
        with self.session() as session:
            return list(session.scalars(query))

    def running_runs(self: HasSessions) -> list[Run]:
        """Every running run, the longest running first, to judge leases and timeouts."""
        with self.session() as session:
            return _snapshots(session.scalars(select(RunRow).where(
                RunRow.status == RunStatus.RUNNING.value).order_by(RunRow.started_at)))

    def run_queues(self: HasSessions) -> set[str]:
        """Names of every queue any run was sent to (the queues worth checking in Redis)."""
        with self.session() as session:
            return set(session.scalars(select(RunRow.queue).distinct()))

    # Dead letters ------------------------------------------------------------------

    def dead_letter_counts(self: HasSessions, *, since: datetime
                           ) -> list[tuple[str, str | None, int]]:
        """(processor, error code, count) of dead letters that ended at or after `since`,
        so an operator sees what keeps failing without reading every run."""
        query = (select(RunRow.processor, RunRow.error_code, func.count())
                 .where(RunRow.status == RunStatus.DEAD_LETTER.value,
                        RunRow.finished_at >= since)
                 .group_by(RunRow.processor, RunRow.error_code))
        with self.session() as session:
            rows = session.execute(query).all()
        return [(processor, code, int(count)) for processor, code, count in rows]

    def dead_letters(self: HasSessions, *, since: datetime, processor: str | None = None,
                     error_code: str | None = None) -> list[Run]:
        """Dead letters that ended at or after `since`, oldest run first, optionally of
        one processor and/or error code: what `ops dead-letters` lists and replays."""
        query = select(RunRow).where(RunRow.status == RunStatus.DEAD_LETTER.value,
                                     RunRow.finished_at >= since)
        if processor:
            query = query.where(RunRow.processor == processor)
        if error_code:
            query = query.where(RunRow.error_code == error_code)
        with self.session() as session:
            return _snapshots(session.scalars(query.order_by(RunRow.id)))

    def replays_of(self: HasSessions, run_ids: Collection[str]
                   ) -> list[tuple[str, str, str]]:
        """(original id, replay id, replay status) of every replay of the given runs,
        so a dead letter shows whether it was replayed and how that went. No ids, no
        query."""
        if not run_ids:
            return []
        query = select(RunRow.replay_of, RunRow.id, RunRow.status).where(
            RunRow.replay_of.in_(list(run_ids)))
        with self.session() as session:
            rows = session.execute(query).all()
        return [(original, replay_id, status) for original, replay_id, status in rows
                if original is not None]

    # Stored logs and database size ----------------------------------------------------

    def stored_log_bytes(self: HasSessions) -> int:
        """Bytes of captured output stored for all runs (what `prune-logs` can free)."""
        with self.session() as session:
            total = session.scalar(select(
                func.coalesce(func.sum(func.length(LogChunkRow.data)), 0)))
        return int(total or 0)

    def log_bytes_by_processor(self: HasSessions, *, limit: int = 10) -> dict[str, int]:
        """Stored output bytes per processor, the `limit` biggest, biggest first."""
        size = func.sum(func.length(LogChunkRow.data))
        query = (select(RunRow.processor, size)
                 .join(RunRow, RunRow.id == LogChunkRow.run_id)
                 .group_by(RunRow.processor).order_by(size.desc()).limit(limit))
        with self.session() as session:
            rows = session.execute(query).all()
        return {processor: int(n) for processor, n in rows}

    def top_runs_by_log_bytes(self: HasSessions, *, limit: int = 5) -> dict[str, int]:
        """Stored output bytes of the `limit` runs with the most, biggest first."""
        size = func.sum(func.length(LogChunkRow.data))
        query = (select(LogChunkRow.run_id, size).group_by(LogChunkRow.run_id)
                 .order_by(size.desc()).limit(limit))
        with self.session() as session:
            rows = session.execute(query).all()
        return {run_id: int(n) for run_id, n in rows}

    def truncated_runs_by_processor(self: HasSessions, *, since: datetime) -> dict[str, int]:
        """Runs created at or after `since` whose output was cut at the log cap, per
        processor: a sign that a processor logs too much."""
        query = (select(RunRow.processor, func.count())
                 .where(RunRow.log_truncated.is_(True), RunRow.created_at >= since)
                 .group_by(RunRow.processor))
        with self.session() as session:
            rows = session.execute(query).all()
        return {processor: int(n) for processor, n in rows}

    def database_bytes(self: HasSessions) -> int | None:
        """Size of the whole database as PostgreSQL reports it; None on other engines
        (a SQLite caller measures its file instead)."""
        if self.engine.dialect.name != "postgresql":
            return None
        with self.session() as session:
            size = session.scalar(select(func.pg_database_size(func.current_database())))
        return None if size is None else int(size)

    def logs_ended_before(self: HasSessions, *, cutoff: datetime,
                          processor: str | None = None) -> tuple[int, int]:
        """(chunks, bytes) of stored output of runs that ended before `cutoff`, optionally
        of one processor: what `delete_logs_ended_before` would delete."""
        with self.session() as session:
            return _tally(session, _chunks_of_runs_ended_before(cutoff, processor))

    def delete_logs_ended_before(self: HasSessions, *, cutoff: datetime,
                                 processor: str | None = None) -> tuple[int, int]:
        """Delete the stored output of runs that ended before `cutoff` (the runs stay);
        returns the (chunks, bytes) deleted, counted in the same transaction."""
        chosen = _chunks_of_runs_ended_before(cutoff, processor)
        with self.session() as session:
            found = _tally(session, chosen)
            session.execute(delete(LogChunkRow).where(chosen)
                            .execution_options(synchronize_session=False))
        return found

    # Retention -------------------------------------------------------------------

    def count_runs_ended_before(self: HasSessions, *, cutoff: datetime) -> int:
        """Runs in a final status that ended before `cutoff` (what retention removes)."""
        with self.session() as session:
            return int(session.scalar(select(func.count()).select_from(RunRow).where(
                RunRow.status.in_(_TERMINAL), RunRow.finished_at < cutoff)) or 0)

    def prune_runs_ended_before(self: HasSessions, *, cutoff: datetime,
                                batch: int = 500) -> int:
        """Delete up to `batch` runs that ended before `cutoff`, oldest first, with
        their attempts, stored output, files' and artifacts' rows and webhook
        deliveries, in one short transaction; the number deleted.

        Small batches keep each transaction (and its locks) short, so retention on a
        large table never stalls the workers' writes; call again until it returns 0.
        Queued and running runs are never touched.
        """
        with self.session() as session:
            ids = list(session.scalars(select(RunRow.id).where(
                RunRow.status.in_(_TERMINAL), RunRow.finished_at < cutoff)
                .order_by(RunRow.finished_at).limit(batch)))
            if not ids:
                return 0
            for table in (LogChunkRow, ArtifactRow, RunFileRow, WebhookDeliveryRow):
                session.execute(delete(table).where(table.run_id.in_(ids))
                                .execution_options(synchronize_session=False))
            session.execute(delete(AttemptRow).where(AttemptRow.run_id.in_(ids))
                            .execution_options(synchronize_session=False))
            session.execute(delete(RunRow).where(RunRow.id.in_(ids))
                            .execution_options(synchronize_session=False))
        return len(ids)
