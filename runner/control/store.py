"""The database is the truth about runs: every read and write of runs, attempts, logs, keys.

Callers get frozen snapshots (`Run`), never ORM objects, so no session leaks out.
Writes of an attempt are fenced by its attempt number and status, so a late write
from a worker that lost its run changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Engine,
    Executable,
    LargeBinary,
    Select,
    create_engine,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import SQLAlchemyError as _SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from runner.control.models import AttemptRow, LogChunkRow, RunRow, TenantRow
from runner.control.reports import StoreReports
from runner.control.rows import aware, run_from_row
from runner.domain import NewRun, Run, RunStatus, utcnow
from runner.errors import InvalidRequestError, QuotaExceededError, ServiceUnavailableError

SQLAlchemyError = _SQLAlchemyError


def new_run_id() -> str:
    """A UUID-shaped id whose first 48 bits are the creation time in ms (sortable)."""
    raw = f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def encode_cursor(run_id: str) -> str:
    return base64.urlsafe_b64encode(run_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """Raises: InvalidRequestError for a cursor this API did not hand out."""
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError("invalid cursor", field="cursor") from exc
    if len(value) != 36:
        raise InvalidRequestError("invalid cursor", field="cursor")
    return value


def captured_bytes(run_id: str) -> Select[Any]:
    """Bytes of output stored for a run, over every attempt (a query to run or embed)."""
    return (select(func.coalesce(func.sum(func.length(LogChunkRow.data)), 0))
            .where(LogChunkRow.run_id == run_id))


def rows_changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE changed: how a conditional write learns whether it won."""
    result = cast(CursorResult[Any], session.execute(statement))
    return result.rowcount


class Store(StoreReports):
    """All database access. One per process; thread-safe."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._tenants_seen: set[str] = set()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction; platform errors become ServiceUnavailableError."""
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            raise ServiceUnavailableError(f"database unavailable: {exc.orig}") from exc

    def ping(self) -> None:
        with self.session() as session:
            session.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    # Runs ------------------------------------------------------------------

    def _existing(self, new: NewRun) -> Run | None:
        """The tenant's run under this idempotency key, if any.

        Raises:
            InvalidRequestError: the key was used before with a different request.
        """
        if new.idempotency_key is None:
            return None
        with self.session() as session:
            row = session.scalar(select(RunRow).where(
                RunRow.tenant == new.tenant, RunRow.idempotency_key == new.idempotency_key))
            run = run_from_row(row) if row is not None else None
        if run is not None and run.request_hash != new.request_hash:
            raise InvalidRequestError(
                "this Idempotency-Key was used with a different request body",
                field="Idempotency-Key")
        return run

    def create_run(self, new: NewRun, *, max_active: int = 0) -> tuple[Run, bool]:
        """Insert a queued run; with an idempotency key, the tenant's existing run wins.

        Returns the run and whether this call created it. Of concurrent calls with one
        key exactly one inserts (a unique constraint decides); the others get that run.
        With `max_active`, the tenant's queued + running runs are capped: the check and
        the insert happen under a lock on the tenant's row, so API processes racing
        each other cannot overshoot it.

        Raises:
            InvalidRequestError: the key was used before with a different request.
            QuotaExceededError: the tenant already has `max_active` active runs.
        """
        existing = self._existing(new)
        if existing is not None:
            return existing, False
        row = RunRow(
            id=new_run_id(), tenant=new.tenant, status=RunStatus.QUEUED.value,
            processor=new.processor, version=new.version, image=new.image, queue=new.queue,
            input=new.input, labels=new.labels, timeout_seconds=new.timeout_seconds,
            attempt=0, max_attempts=new.max_attempts, manifest_revision=new.manifest_revision,
            log_bytes=0, log_truncated=False, created_at=utcnow(),
            idempotency_key=new.idempotency_key, request_hash=new.request_hash,
            replay_of=new.replay_of, traceparent=new.traceparent,
        )
        if max_active > 0:
            self._ensure_tenant(new.tenant)
        try:
            with self.session() as session:
                if max_active > 0:
                    # The UPDATE takes the row lock (PostgreSQL) or the write lock
                    # (SQLite) until commit: quota checks of one tenant run one by one.
                    if rows_changed(session, update(TenantRow)
                                .where(TenantRow.tenant == new.tenant)
                                .values(touched_at=utcnow())) == 0:
                        # The row went away (a restored database): make it again, in
                        # this transaction, so the lock is still held by the insert.
                        self._tenants_seen.discard(new.tenant)
                        session.add(TenantRow(tenant=new.tenant, touched_at=utcnow()))
                        session.flush()
                    active = session.scalar(select(func.count()).select_from(RunRow).where(
                        RunRow.tenant == new.tenant,
                        RunRow.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value])))
                    if (active or 0) >= max_active:
                        raise QuotaExceededError(
                            f"tenant {new.tenant} has {active} queued or running runs, "
                            f"its cap is {max_active}", retry_after=5)
                session.add(row)
            return run_from_row(row), True
        except IntegrityError:
            if new.idempotency_key is None:
                raise
        existing = self._existing(new)
        if existing is None:  # deleted in between: vanishingly rare, and safe to refuse
            raise InvalidRequestError("idempotency key conflict; retry the request",
                                      field="Idempotency-Key")
        return existing, False

    def _ensure_tenant(self, tenant: str) -> None:
        """The tenant's lock row exists (rows are never deleted, so once seen, always)."""
        if tenant in self._tenants_seen:
            return
        self._ensure_tenant_row(tenant)
        self._tenants_seen.add(tenant)

    def _ensure_tenant_row(self, tenant: str) -> None:
        with self.session() as session:
            if session.get(TenantRow, tenant) is not None:
                return
        try:
            with self.session() as session:
                session.add(TenantRow(tenant=tenant, touched_at=utcnow()))
        except IntegrityError:
            pass  # another process made it first

    def run_status(self, run_id: str) -> str | None:
        """Only the run's status (a long poll reads it many times)."""
        with self.engine.connect() as conn:
            status: str | None = conn.scalar(select(RunRow.status).where(RunRow.id == run_id))
        return status

    def get_run(self, run_id: str, *, tenant: str | None = None) -> Run | None:
        """The run, or None if it does not exist or belongs to another tenant."""
        with self.session() as session:
            row = session.get(RunRow, run_id)
            if row is None or (tenant is not None and row.tenant != tenant):
                return None
            return run_from_row(row)

    def list_runs(self, *, tenant: str | None, status: str | None = None,
                  processor: str | None = None, limit: int = 50,
                  cursor: str | None = None, labels: dict[str, str] | None = None,
                  created_after: datetime | None = None,
                  created_before: datetime | None = None) -> tuple[list[Run], str | None]:
        """Newest first, keyset-paginated by the time-ordered run id."""
        query = select(RunRow).order_by(RunRow.id.desc()).limit(limit + 1)
        for key, value in (labels or {}).items():
            query = query.where(RunRow.labels[key].as_string() == value)
        if created_after is not None:
            query = query.where(RunRow.created_at >= created_after)
        if created_before is not None:
            query = query.where(RunRow.created_at < created_before)
        if tenant is not None:
            query = query.where(RunRow.tenant == tenant)
        if status is not None:
            query = query.where(RunRow.status == status)
        if processor is not None:
            query = query.where(RunRow.processor == processor)
        if cursor is not None:
            query = query.where(RunRow.id < decode_cursor(cursor))
        with self.session() as session:
            rows = list(session.scalars(query))
        runs = [run_from_row(r) for r in rows[:limit]]
        next_cursor = encode_cursor(runs[-1].id) if len(rows) > limit else None
        return runs, next_cursor

    def record_container(self, run_id: str, attempt: int, *, container_id: str | None = None,
                         image_id: str | None = None,
                         provenance: dict[str, Any] | None = None) -> None:
        """What the attempt started: container, image id and provenance receipt."""
        values: dict[str, Any] = {"container_id": container_id, "image_id": image_id,
                                  "provenance": provenance}
        with self.session() as session:
            session.execute(
                update(AttemptRow)
                .where(AttemptRow.run_id == run_id, AttemptRow.number == attempt)
                .values(**{k: v for k, v in values.items() if v is not None})
            )

    def append_log(self, run_id: str, attempt: int, *, offset: int, data: bytes) -> None:
        """Store one chunk of captured output, fenced by the attempt still running.

        One INSERT ... SELECT that takes no lock on the run's row, so a worker frozen
        mid-write cannot block the reconciler from taking its run back. The run's
        `log_bytes` is brought up to date when the attempt ends.
        """
        live = select(literal(run_id), literal(attempt), literal(offset),
                      literal(data, LargeBinary())).where(
            RunRow.id == run_id, RunRow.attempt == attempt,
            RunRow.status == RunStatus.RUNNING.value)
        with self.session() as session:
            session.execute(insert(LogChunkRow).from_select(
                ["run_id", "attempt", "offset", "data"], live))

    def read_logs(self, run_id: str, *, offset: int = 0, limit: int | None = None) -> bytes:
        """Captured output from byte `offset` on (all attempts, in order)."""
        with self.session() as session:
            chunks = session.execute(
                select(LogChunkRow.offset, LogChunkRow.data)
                .where(LogChunkRow.run_id == run_id)
                .order_by(LogChunkRow.offset)
            ).all()
        out = bytearray()
        for start, data in chunks:
            end = start + len(data)
            if end <= offset:
                continue
            out += data[max(0, offset - start):]
            if limit is not None and len(out) >= limit:
                return bytes(out[:limit])
        return bytes(out)

    def log_offset(self, run_id: str) -> int:
        """Bytes of output captured so far, over every attempt."""
        with self.session() as session:
            total = session.scalar(captured_bytes(run_id))
        return int(total or 0)

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        with self.session() as session:
            rows = session.scalars(select(AttemptRow).where(AttemptRow.run_id == run_id)
                                   .order_by(AttemptRow.number))
            return [
                {"number": r.number, "worker_id": r.worker_id, "status": r.status,
                 "container_id": r.container_id, "image_id": r.image_id,
                 "exit_code": r.exit_code, "error_code": r.error_code,
                 "error_message": r.error_message, "error_stage": r.error_stage,
                 "log_bytes": r.log_bytes, "provenance": r.provenance,
                 "started_at": aware(r.started_at), "finished_at": aware(r.finished_at)}
                for r in rows
            ]


def make_engine(url: str) -> Engine:
    """An engine with sane pool settings; SQLite gets WAL and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # A client frozen inside a transaction (a stopped worker) must not hold row locks
    # for ever: the server ends such a transaction after a minute, and nobody waits on
    # a lock for more than ten seconds (the waiter fails and retries later instead).
    # A server that does not answer at all (a dropped route, not a refusal) costs a
    # connect at most ten seconds, so probes and requests fail instead of hanging.
    options = "-c lock_timeout=10000 -c idle_in_transaction_session_timeout=60000"
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10,
                         connect_args={"options": options, "connect_timeout": 10})
