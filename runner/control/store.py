"""The database is the truth about runs: every read and write of runs, attempts, logs, keys.

Callers get frozen snapshots (`Run`), never ORM objects, so no session leaks out.
Writes of an attempt are fenced by its attempt number and status, so a late write
from a worker that lost its run changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    ColumnElement,
    Engine,
    Executable,
    LargeBinary,
    Text,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import SQLAlchemyError as _SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, defer, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from runner.control.logstore import StoreLogs
from runner.control.models import ArtifactRow, AttemptRow, RunFileRow, RunRow, TenantRow
from runner.control.outbox import outbox_row
from runner.control.reports import StoreReports
from runner.control.rows import aware, new_values, run_from_row, snapshot
from runner.domain import Artifact, NewRun, Run, RunStatus, utcnow
from runner.errors import InvalidRequestError, QuotaExceededError, ServiceUnavailableError

SQLAlchemyError = _SQLAlchemyError

# How long a client is told to wait when every pooled database connection is busy.
POOL_BUSY_RETRY_SECONDS = 2
# The shape of every run id (`new_run_id`). Anything else names no run, and never
# reaches the database: PostgreSQL refuses text with a NUL character in it.
RUN_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# The run values a list may leave out (`Store.list_page`).
RUN_VALUES = ("input", "result")


def is_run_id(value: str) -> bool:
    """Whether `value` has the shape of a run id (36 characters, hex and dashes)."""
    return RUN_ID.fullmatch(value) is not None


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
    if not is_run_id(value):  # also keeps a NUL character away from PostgreSQL
        raise InvalidRequestError("invalid cursor", field="cursor")
    return value


@dataclass(frozen=True)
class RunPage:
    """A page of runs (`Store.list_page`). `left_out` names, per run id, the values
    (`input`, `result`) that were not read; those are None in the `Run`."""

    runs: list[Run]
    next_cursor: str | None
    left_out: dict[str, tuple[str, ...]] = field(default_factory=dict)


def add_artifacts(session: Session, run_id: str, attempt: int, tenant: str,
                  artifacts: Collection[Artifact]) -> None:
    """Record what attempt `attempt` left under /run/out (inside the caller's transaction:
    with the attempt's end, or with a reuse hit's insert)."""
    session.add_all(ArtifactRow(run_id=run_id, attempt=attempt, name=a.name, tenant=tenant,
                                size=a.size, sha256=a.sha256, media_type=a.media_type)
                    for a in artifacts)


def rows_changed(session: Session, statement: Executable) -> int:
    """Rows an UPDATE changed: how a conditional write learns whether it won."""
    result = cast(CursorResult[Any], session.execute(statement))
    return result.rowcount


def active_runs_locked(session: Session, tenant: str, cap: int) -> int:
    """The tenant's queued and running runs, counted up to `cap` (a quota check needs
    no more), under the tenant's row lock: the UPDATE takes it (PostgreSQL; the write
    lock on SQLite) until commit, so quota checks of one tenant run one by one."""
    if rows_changed(session, update(TenantRow).where(TenantRow.tenant == tenant)
                    .values(touched_at=utcnow())) == 0:
        # The row went away (a restored database): make it again, in this
        # transaction, so the lock is still held by the insert.
        session.add(TenantRow(tenant=tenant, touched_at=utcnow()))
        session.flush()
    active = select(RunRow.id).where(
        RunRow.tenant == tenant,
        RunRow.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value])).limit(cap)
    return int(session.scalar(select(func.count()).select_from(active.subquery())) or 0)


class Store(StoreLogs, StoreReports):
    """All database access. One per process; thread-safe."""

    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 10,
                 pool_timeout: float = 30.0) -> None:
        """`pool_*`: the connection pool (PostgreSQL): `pool_size` kept open, up to
        `max_overflow` more under load, and how long a caller waits for a free one
        before ServiceUnavailableError."""
        self.url = url
        self.engine: Engine = make_engine(url, pool_size=pool_size, max_overflow=max_overflow,
                                          pool_timeout=pool_timeout)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._tenants_seen: set[str] = set()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction; platform errors become ServiceUnavailableError.

        Every pooled connection busy past the pool's timeout is one of them, with a
        `retry_after` (the API answers 503 with Retry-After); so is a database that
        cannot be reached or a lock not granted in time.
        """
        with _platform_errors(), self._sessions.begin() as session:
            yield session

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

    def create_run(self, new: NewRun, *, max_active: int = 0,
                   webhook_url: str | None = None) -> tuple[Run, bool]:
        """Insert a queued run; with an idempotency key, the tenant's existing run wins.

        `webhook_url` (checked by the caller) is where the run's end is POSTed; a reuse
        hit, created already ended, gets its delivery in the same transaction.

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
        now = utcnow()
        values = new_values(new, webhook_url, new_run_id(), now)
        if max_active > 0:
            self.ensure_tenant(new.tenant)
        try:
            with self.session() as session:
                if max_active > 0:
                    active = active_runs_locked(session, new.tenant, max_active)
                    if active >= max_active:
                        raise QuotaExceededError(
                            f"tenant {new.tenant} has {active} queued or running runs, "
                            f"its cap is {max_active}", retry_after=5)
                # One INSERT of the values, without the ORM's unit of work.
                session.execute(insert(RunRow).values(**values))
                for name, file_id in new.files.items():
                    session.add(RunFileRow(run_id=values["id"], name=name, tenant=new.tenant,
                                           sha256=file_id.removeprefix("sha256:")))
                # A reuse hit's artifacts are its source's, recorded as its own (attempt 0).
                add_artifacts(session, values["id"], 0, new.tenant, new.artifacts)
                if new.reused_from is not None and webhook_url is not None:
                    session.add(outbox_row(values["id"], webhook_url, now))
            return replace(snapshot(values), artifacts=tuple(new.artifacts)), True
        except IntegrityError:
            if new.idempotency_key is None:
                raise
        existing = self._existing(new)
        if existing is None:  # deleted in between: vanishingly rare, and safe to refuse
            raise InvalidRequestError("idempotency key conflict; retry the request",
                                      field="Idempotency-Key")
        return existing, False

    def ensure_tenant(self, tenant: str) -> None:
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

    def find_reusable(self, *, tenant: str, reuse_key: str,
                      not_before: datetime | None) -> Run | None:
        """The tenant's newest succeeded run with this reuse key (finished at or after
        `not_before`), or None."""
        query = select(RunRow).where(RunRow.tenant == tenant, RunRow.reuse_key == reuse_key,
                                     RunRow.status == RunStatus.SUCCEEDED.value)
        if not_before is not None:
            query = query.where(RunRow.finished_at >= not_before)
        with self.session() as session:
            row = session.scalar(query.order_by(RunRow.finished_at.desc()).limit(1))
            return run_from_row(row) if row is not None else None

    def run_status(self, run_id: str) -> str | None:
        """Only the run's status (a long poll reads it many times)."""
        if not is_run_id(run_id):
            return None
        with _platform_errors(), self.engine.connect() as conn:
            status: str | None = conn.scalar(select(RunRow.status).where(RunRow.id == run_id))
        return status

    def get_run(self, run_id: str, *, tenant: str | None = None) -> Run | None:
        """The run, or None if it does not exist, belongs to another tenant, or `run_id`
        is not shaped like a run id (then the database is not asked)."""
        if not is_run_id(run_id):
            return None
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
        """Newest first, keyset-paginated by the time-ordered run id; every value read."""
        page = self.list_page(tenant=tenant, status=status, processor=processor, limit=limit,
                              cursor=cursor, labels=labels, created_after=created_after,
                              created_before=created_before, values=RUN_VALUES)
        return page.runs, page.next_cursor

    def list_page(self, *, tenant: str | None, status: str | None = None,
                  processor: str | None = None, limit: int = 50,
                  cursor: str | None = None, labels: dict[str, str] | None = None,
                  created_after: datetime | None = None,
                  created_before: datetime | None = None,
                  values: Collection[str] = (),
                  value_max_bytes: int | None = None) -> RunPage:
        """Like `list_runs`, reading of `input` and `result` only those in `values`,
        and of those only the ones of at most `value_max_bytes` as stored (the size is
        measured in the database: a larger value is never sent over, nor parsed).
        The others are None in the runs, and named in the page's `left_out`."""
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
        asked = [name for name in RUN_VALUES if name in values]
        for name in RUN_VALUES:
            column = getattr(RunRow, name)
            query = query.options(defer(column))
            if name not in asked:
                continue
            size = self._stored_size(column)
            loaded: ColumnElement[Any] = column
            if value_max_bytes is not None:  # NULL in the database past the cap
                loaded = type_coerce(case((size <= value_max_bytes, column)), JSON)
            query = query.add_columns(loaded.label(name), size.label(f"{name}_bytes"))
        left_out: dict[str, tuple[str, ...]] = {}
        runs: list[Run] = []
        with self.session() as session:
            rows = session.execute(query).all()
            for row in rows[:limit]:
                run_row, got = row[0], row._mapping
                missing = []
                for name in RUN_VALUES:
                    stored = got[f"{name}_bytes"] if name in asked else None
                    over = (stored is not None and value_max_bytes is not None
                            and stored > value_max_bytes)
                    if name not in asked or over:
                        missing.append(name)
                    set_committed_value(run_row, name, None if name in missing else got[name])
                if missing:
                    left_out[run_row.id] = tuple(missing)
                runs.append(run_from_row(run_row))
        next_cursor = encode_cursor(runs[-1].id) if len(rows) > limit else None
        return RunPage(runs=runs, next_cursor=next_cursor, left_out=left_out)

    def _stored_size(self, column: Any) -> ColumnElement[Any]:
        """Bytes of a JSON column's stored text, computed in the database."""
        if self.engine.dialect.name == "postgresql":
            return func.octet_length(sql_cast(column, Text))
        return func.length(sql_cast(column, LargeBinary))

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

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        with self.session() as session:
            rows = session.scalars(select(AttemptRow).where(AttemptRow.run_id == run_id)
                                   .order_by(AttemptRow.number))
            return [
                {"number": r.number, "worker_id": r.worker_id, "host_id": r.host_id,
                 "status": r.status,
                 "container_id": r.container_id, "image_id": r.image_id,
                 "exit_code": r.exit_code, "error_code": r.error_code,
                 "error_message": r.error_message, "error_stage": r.error_stage,
                 "log_bytes": r.log_bytes, "provenance": r.provenance,
                 "started_at": aware(r.started_at), "finished_at": aware(r.finished_at)}
                for r in rows
            ]


@contextmanager
def _platform_errors() -> Iterator[None]:
    """The database's own failures as ServiceUnavailableError."""
    try:
        yield
    except PoolTimeoutError as exc:
        raise ServiceUnavailableError(
            "database busy: no connection free in the pool; retry shortly",
            retry_after=POOL_BUSY_RETRY_SECONDS) from exc
    except OperationalError as exc:
        raise ServiceUnavailableError(f"database unavailable: {exc.orig}") from exc


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10,
                pool_timeout: float = 30.0) -> Engine:
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
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size,
                         max_overflow=max_overflow, pool_timeout=pool_timeout,
                         connect_args={"options": options, "connect_timeout": 10})
