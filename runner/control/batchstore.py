"""Recording a batch of new runs in one transaction (`POST /v1/runs/batch`).

What `Store.create_run` does for one run, done for many at once: one lookup of the
batch's idempotency keys, one quota check under the tenant's row lock, one
multi-row insert, one commit. Each item still gets its own answer: its run, the
earlier run its key names, or its own error.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from runner.control.models import RunFileRow, RunRow, TenantRow
from runner.control.outbox import outbox_row
from runner.control.rows import run_from_row
from runner.control.store import Store, add_artifacts, rows_changed
from runner.domain import NewRun, Run, RunStatus, utcnow
from runner.errors import InvalidRequestError, QuotaExceededError, RunnerError

# One item's outcome: (its run, whether this batch created it), or why it was refused.
Outcome = tuple[Run, bool] | RunnerError


def _key_conflict() -> InvalidRequestError:
    return InvalidRequestError("this idempotency_key was used with a different request",
                               field="idempotency_key")


def _new_values(new: NewRun, webhook_url: str | None, run_id: str,
                now: datetime) -> dict[str, Any]:
    """The `runs` row of a new run, as column values (written by one multi-row INSERT,
    without the ORM's per-object bookkeeping)."""
    reused = new.reused_from is not None
    return {
        "id": run_id, "tenant": new.tenant,
        "status": (RunStatus.SUCCEEDED if reused else RunStatus.QUEUED).value,
        "processor": new.processor, "version": new.version, "image": new.image,
        "queue": new.queue, "input": new.input, "labels": new.labels,
        "timeout_seconds": new.timeout_seconds, "attempt": 0,
        "max_attempts": new.max_attempts, "manifest_revision": new.manifest_revision,
        "log_bytes": 0, "log_truncated": False, "created_at": now,
        "idempotency_key": new.idempotency_key, "request_hash": new.request_hash,
        "replay_of": new.replay_of, "traceparent": new.traceparent,
        "files": dict(new.files) or None, "reuse_key": new.reuse_key,
        "reused_from": new.reused_from, "result": new.result if reused else None,
        "started_at": now if reused else None, "finished_at": now if reused else None,
        "exit_code": 0 if reused else None, "webhook_url": webhook_url,
        "priority": new.priority.value}


def _snapshot(values: dict[str, Any]) -> Run:
    """The run just written, from its values (the columns not written are unset)."""
    unset = dict.fromkeys(("result", "exit_code", "error_code", "error_message",
                           "worker_id", "started_at", "finished_at", "next_attempt_at",
                           "lease_expires_at", "cancel_requested_at", "error_stage"))
    return run_from_row(cast(RunRow, SimpleNamespace(**{**unset, **values})))


def new_run_ids(count: int) -> list[str]:
    """`count` run ids shaped as `new_run_id`'s, from one read of the system's random
    source (one per id costs a system call each)."""
    stamp = f"{int(time.time() * 1000):012x}"
    noise = secrets.token_hex(10 * count)
    raws = (stamp + noise[i * 20:(i + 1) * 20] for i in range(count))
    return [f"{r[:8]}-{r[8:12]}-{r[12:16]}-{r[16:20]}-{r[20:]}" for r in raws]


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
        # A reuse hit shows the artifacts it was recorded with.
        return [(replace(o[0], artifacts=tuple(items[i][0].artifacts)), o[1])
                if isinstance(o, tuple) and o[1] and items[i][0].artifacts else o
                for i, o in enumerate(outcomes)]
    except IntegrityError:
        if not any(new.idempotency_key for new, _ in items):
            raise
    return list(_one_by_one(store, items, max_active))


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
    rows: list[tuple[dict[str, Any], NewRun]] = []
    ids, now = iter(new_run_ids(len(items))), utcnow()
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
        values = _new_values(new, webhook_url, next(ids), now)
        if key is not None:
            in_batch[key] = (new.request_hash, len(outcomes))
        rows.append((values, new))
        outcomes.append((_snapshot(values), True))
    if rows:
        session.execute(insert(RunRow), [values for values, _ in rows])
    for values, new in rows:
        run_id = values["id"]
        for name, file_id in new.files.items():
            session.add(RunFileRow(run_id=run_id, name=name, tenant=tenant,
                                   sha256=file_id.removeprefix("sha256:")))
        # A reuse hit's artifacts are its source's, recorded as its own (attempt 0).
        add_artifacts(session, run_id, 0, tenant, new.artifacts)
        if new.reused_from is not None and values["webhook_url"] is not None:
            session.add(outbox_row(run_id, values["webhook_url"], now))
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
