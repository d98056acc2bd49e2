"""Read-only questions the web dashboard asks (`api/ui/`) that the store does not.

Every run query here is scoped to one tenant, as the API's own lookups are, and reads
only the columns a page shows (never a run's `input` or `result`, which may be large).
The Redis side (RQ's worker registrations and queue lengths) is read here too, so the
API layer never reaches into RQ's data structures itself; `runner ops status` reads the
same registrations.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Worker
from sqlalchemy import func, select

from runner.control.lanes import queue_depths as lane_depths
from runner.control.models import RunRow
from runner.control.rows import aware
from runner.control.store import Store, decode_cursor, encode_cursor, is_run_id
from runner.domain import RunStatus
from runner.errors import ServiceUnavailableError

MAX_IDS = 200  # the most runs one live poll may ask about


@dataclass(frozen=True)
class RunState:
    """What a live list row shows of a run that may have changed since the page."""

    id: str
    status: str
    processor: str
    version: str
    attempt: int
    max_attempts: int
    labels: dict[str, str]
    error_code: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    log_truncated: bool = False
    cancel_requested: bool = False

    def public(self) -> dict[str, Any]:
        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {"id": self.id, "status": self.status, "processor": self.processor,
                "version": self.version, "attempt": self.attempt,
                "max_attempts": self.max_attempts, "labels": self.labels,
                "error_code": self.error_code, "created_at": iso(self.created_at),
                "started_at": iso(self.started_at), "finished_at": iso(self.finished_at)}


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter as its list shows it: why it ended, not what it carried."""

    id: str
    processor: str
    version: str
    error_code: str | None
    error_stage: str | None
    error_message: str | None
    attempt: int
    log_bytes: int
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class WorkerInfo:
    """One RQ worker registration: alive while its key lives (RQ renews it)."""

    name: str
    hostname: str
    pid: int | None
    state: str
    queues: list[str]
    current_job: str | None
    draining: bool
    birth: datetime | None
    last_heartbeat: datetime | None

    @property
    def run_id(self) -> str | None:
        """The run of the job it holds (`run-<id>-<attempt>`), if it holds one."""
        job = self.current_job or ""
        if not job.startswith("run-"):
            return None
        candidate = job.removeprefix("run-").rsplit("-", 1)[0]
        return candidate if is_run_id(candidate) else None


_STATE_COLUMNS = (RunRow.id, RunRow.status, RunRow.processor, RunRow.version,
                  RunRow.attempt, RunRow.max_attempts, RunRow.labels, RunRow.error_code,
                  RunRow.created_at, RunRow.started_at, RunRow.finished_at,
                  RunRow.log_truncated, RunRow.cancel_requested_at)


class UiQueries:
    """The dashboard's named read queries over runs, scoped to a tenant."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def run_states(self, *, tenant: str, ids: Collection[str]) -> list[RunState]:
        """The tenant's runs among `ids` (at most MAX_IDS; other tenants' ids and
        strings not shaped like run ids are left out silently), newest first: what a
        live page polls, so never a run's input or result."""
        wanted = [i for i in list(ids)[:MAX_IDS] if is_run_id(i)]
        if not wanted:
            return []
        query = select(*_STATE_COLUMNS).where(RunRow.tenant == tenant,
                                              RunRow.id.in_(wanted))
        with self.store.session() as session:
            rows = session.execute(query.order_by(RunRow.id.desc())).all()
        return [RunState(id=r.id, status=r.status, processor=r.processor,
                         version=r.version, attempt=r.attempt, max_attempts=r.max_attempts,
                         labels=dict(r.labels or {}), error_code=r.error_code,
                         created_at=_utc(r.created_at), started_at=aware(r.started_at),
                         finished_at=aware(r.finished_at),
                         log_truncated=bool(r.log_truncated),
                         cancel_requested=r.cancel_requested_at is not None) for r in rows]

    def tenant_run_ids(self, *, tenant: str, ids: Collection[str]) -> set[str]:
        """Which of `ids` are the tenant's runs (what a worker list may link to)."""
        return {state.id for state in self.run_states(tenant=tenant, ids=ids)}

    def dead_letters(self, *, tenant: str, limit: int = 50, cursor: str | None = None
                     ) -> tuple[list[DeadLetter], str | None]:
        """The tenant's dead letters, newest first, keyset-paginated like run lists.

        Raises:
            InvalidRequestError: a cursor this API did not hand out.
        """
        query = (select(RunRow.id, RunRow.processor, RunRow.version, RunRow.error_code,
                        RunRow.error_stage, RunRow.error_message, RunRow.attempt,
                        RunRow.log_bytes, RunRow.created_at, RunRow.finished_at)
                 .where(RunRow.tenant == tenant,
                        RunRow.status == RunStatus.DEAD_LETTER.value)
                 .order_by(RunRow.id.desc()).limit(limit + 1))
        if cursor is not None:
            query = query.where(RunRow.id < decode_cursor(cursor))
        with self.store.session() as session:
            rows = session.execute(query).all()
        found = [DeadLetter(id=r.id, processor=r.processor, version=r.version,
                            error_code=r.error_code, error_stage=r.error_stage,
                            error_message=r.error_message, attempt=r.attempt,
                            log_bytes=int(r.log_bytes or 0), created_at=_utc(r.created_at),
                            finished_at=aware(r.finished_at)) for r in rows[:limit]]
        return found, (encode_cursor(found[-1].id) if len(rows) > limit else None)

    def count_dead_letters(self, *, tenant: str) -> int:
        with self.store.session() as session:
            return int(session.scalar(select(func.count()).select_from(RunRow).where(
                RunRow.tenant == tenant,
                RunRow.status == RunStatus.DEAD_LETTER.value)) or 0)

    def recent_error_count(self, *, error_code: str, since: datetime) -> int:
        """Runs of any tenant whose last attempt ended with `error_code` since `since`:
        a platform health signal (e.g. docker_unavailable), never a tenant's data."""
        with self.store.session() as session:
            return int(session.scalar(select(func.count()).select_from(RunRow).where(
                RunRow.error_code == error_code, RunRow.finished_at >= since)) or 0)


def _utc(moment: datetime) -> datetime:
    return aware(moment) or moment.replace(tzinfo=UTC)


def registered_workers(redis: Redis, queues: Collection[str]) -> list[WorkerInfo]:
    """The RQ workers registered in Redis that serve any of `queues`, by host and name.

    Raises:
        ServiceUnavailableError: Redis cannot be reached.
    """
    wanted = set(queues)
    try:
        workers = Worker.all(connection=redis)
        found = []
        for worker in workers:
            names = list(worker.queue_names())
            if not set(names) & wanted:
                continue
            found.append(WorkerInfo(
                name=worker.name, hostname=worker.hostname or "unknown",
                pid=worker.pid, state=str(worker.get_state()), queues=names,
                current_job=worker.get_current_job_id(),
                draining=worker.shutdown_requested_date is not None,
                birth=aware(worker.birth_date), last_heartbeat=aware(worker.last_heartbeat)))
    except RedisError as exc:
        raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc
    return sorted(found, key=lambda w: (w.hostname, w.name))


def queue_depths(redis: Redis, queues: Collection[str]) -> dict[str, int]:
    """Jobs waiting in each queue (all tenants' lanes: the queue is shared).

    Raises:
        ServiceUnavailableError: Redis cannot be reached.
    """
    try:
        return lane_depths(redis, sorted(queues))
    except RedisError as exc:
        raise ServiceUnavailableError(f"redis unavailable: {exc}") from exc
