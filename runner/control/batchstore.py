"""Recording a batch of new runs in one transaction (`POST /v1/runs/batch`).

What `Store.create_run` does for one run, done for many at once: one lookup of the
batch's idempotency keys, one quota check under the tenant's row lock, one
multi-row insert, one commit. Each item still gets its own answer: its run, the
earlier run its key names, or its own error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from runner.control.models import RunFileRow, RunRow, TenantRow
from runner.control.outbox import outbox_row
from runner.control.rows import run_from_row
from runner.control.store import Store, add_artifacts, new_run_id, rows_changed
from runner.domain import Artifact, NewRun, Run, RunStatus, utcnow
from runner.errors import InvalidRequestError, QuotaExceededError, RunnerError

# One item's outcome: (its run, whether this batch created it), or why it was refused.
Outcome = tuple[Run, bool] | RunnerError


def _key_conflict() -> InvalidRequestError:
    return InvalidRequestError("this idempotency_key was used with a different request",
                               field="idempotency_key")


def _new_row(new: NewRun, webhook_url: str | None) -> RunRow:
    now = utcnow()
    reused = new.reused_from is not None
    return RunRow(
        id=new_run_id(), tenant=new.tenant,
        status=(RunStatus.SUCCEEDED if reused else RunStatus.QUEUED).value,
        processor=new.processor, version=new.version, image=new.image, queue=new.queue,
        input=new.input, labels=new.labels, timeout_seconds=new.timeout_seconds,
        attempt=0, max_attempts=new.max_attempts, manifest_revision=new.manifest_revision,
        log_bytes=0, log_truncated=False, created_at=now,
        idempotency_key=new.idempotency_key, request_hash=new.request_hash,
        replay_of=new.replay_of, traceparent=new.traceparent,
        files=dict(new.files) or None, reuse_key=new.reuse_key,
        reused_from=new.reused_from, result=new.result if reused else None,
        started_at=now if reused else None, finished_at=now if reused else None,
        exit_code=0 if reused else None, webhook_url=webhook_url,
        priority=new.priority.value)


def create_runs(store: Store, items: Sequence[tuple[NewRun, str | None]], *,
                max_active: int = 0) -> list[Outcome]:
    """Insert many queued runs of one tenant in one transaction; an outcome per
    item, in order.

    An item whose idempotency key names an earlier run (of an earlier request, or
    earlier in this batch) gets that run (created False), or InvalidRequestError
    when it asked for something else. With `max_active`, the items past the
    tenant's room under its cap of queued and running runs get QuotaExceededError
    (the check and the insert hold the tenant's row lock, as `create_run` does).
    Should a concurrent request insert one of the keys first, the batch is
    recorded item by item instead, each as `create_run` would (nothing of the
    failed transaction stays).
    """
    if not items:
        return []
    tenants = {new.tenant for new, _ in items}
    if len(tenants) != 1:
        raise ValueError("a batch belongs to one tenant")
    tenant = tenants.pop()
    if max_active > 0:
        store.ensure_tenant(tenant)
    try:
        with store.session() as session:
            outcomes = _record(session, tenant, items, max_active)
        return [(replace(o[0], artifacts=tuple(_artifacts(items[i][0]))), o[1])
                if isinstance(o, tuple) and o[1] else o for i, o in enumerate(outcomes)]
    except IntegrityError:
        if not any(new.idempotency_key for new, _ in items):
            raise
    return list(_one_by_one(store, items, max_active))


def _artifacts(new: NewRun) -> tuple[Artifact, ...]:
    return tuple(new.artifacts)


def _one_by_one(store: Store, items: Sequence[tuple[NewRun, str | None]],
                max_active: int) -> Iterator[Outcome]:
    for new, webhook_url in items:
        try:
            yield store.create_run(new, max_active=max_active, webhook_url=webhook_url)
        except (InvalidRequestError, QuotaExceededError) as exc:
            yield exc


def _record(session: Session, tenant: str, items: Sequence[tuple[NewRun, str | None]],
            max_active: int) -> list[Outcome]:
    keys = {new.idempotency_key for new, _ in items if new.idempotency_key}
    earlier: dict[str, Run] = {}
    if keys:
        earlier = {row.idempotency_key: run_from_row(row) for row in session.scalars(
            select(RunRow).where(RunRow.tenant == tenant, RunRow.idempotency_key.in_(keys)))
            if row.idempotency_key}
    room = None
    if max_active > 0:
        room = max_active - _active_under_lock(session, tenant)
    outcomes: list[Outcome] = []
    in_batch: dict[str, tuple[str | None, int]] = {}  # key -> (request hash, index)
    rows: list[tuple[int, RunRow, NewRun]] = []
    for new, webhook_url in items:
        key = new.idempotency_key
        if key is not None and key in earlier:
            found = earlier[key]
            outcomes.append((found, False) if found.request_hash == new.request_hash
                            else _key_conflict())
            continue
        if key is not None and key in in_batch:
            digest, index = in_batch[key]
            outcomes.append(_key_conflict() if digest != new.request_hash
                            else _same_as(outcomes, index))
            continue
        reused = new.reused_from is not None
        if room is not None and not reused:
            if room <= 0:
                outcomes.append(QuotaExceededError(
                    f"tenant {tenant} is at its cap of {max_active} queued or running "
                    "runs", retry_after=5))
                continue
            room -= 1
        row = _new_row(new, webhook_url)
        if key is not None:
            in_batch[key] = (new.request_hash, len(outcomes))
        rows.append((len(outcomes), row, new))
        outcomes.append((run_from_row(row), True))
    session.add_all(row for _, row, _ in rows)
    session.flush()
    for _, row, new in rows:
        for name, file_id in new.files.items():
            session.add(RunFileRow(run_id=row.id, name=name, tenant=tenant,
                                   sha256=file_id.removeprefix("sha256:")))
        # A reuse hit's artifacts are its source's, recorded as its own (attempt 0).
        add_artifacts(session, row.id, 0, tenant, new.artifacts)
        if new.reused_from is not None and row.webhook_url is not None:
            session.add(outbox_row(row.id, row.webhook_url, row.created_at))
    return outcomes


def _same_as(outcomes: list[Outcome], index: int) -> Outcome:
    """An item repeating an earlier item's key and request: that item's run, not new."""
    first = outcomes[index]
    return (first[0], False) if isinstance(first, tuple) else first


def _active_under_lock(session: Session, tenant: str) -> int:
    """The tenant's queued and running runs, counted under its row lock (held to
    commit: quota checks of one tenant run one by one)."""
    if rows_changed(session, update(TenantRow).where(TenantRow.tenant == tenant)
                    .values(touched_at=utcnow())) == 0:
        session.add(TenantRow(tenant=tenant, touched_at=utcnow()))
        session.flush()
    active = session.scalar(select(func.count()).select_from(RunRow).where(
        RunRow.tenant == tenant,
        RunRow.status.in_([RunStatus.QUEUED.value, RunStatus.RUNNING.value])))
    return int(active or 0)
