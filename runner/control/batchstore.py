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
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from runner.control.models import RunFileRow, RunRow
from runner.control.outbox import outbox_row
from runner.control.rows import new_values, run_from_row, snapshot
from runner.control.store import Store, active_runs_locked, add_artifacts
from runner.domain import NewRun, Run, utcnow
from runner.errors import InvalidRequestError, QuotaExceededError, RunnerError

# One item's outcome: (its run, whether this batch created it), or why it was refused.
Outcome = tuple[Run, bool] | RunnerError


def _key_conflict() -> InvalidRequestError:
    return InvalidRequestError("this idempotency_key was used with a different request",
                               field="idempotency_key")


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
        room = max_active - active_runs_locked(session, tenant, max_active)
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
        values = new_values(new, webhook_url, next(ids), now)
        if key is not None:
            in_batch[key] = (new.request_hash, len(outcomes))
        rows.append((values, new))
        outcomes.append((snapshot(values), True))
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
