"""The webhook outbox: one `webhook_deliveries` row per run end, and its life.

A run's end and its delivery row are written in one transaction (`record_end`,
called by the lifecycle; a reuse hit's row by `Store.create_run`), so no final status
is ever recorded without its delivery, whoever wrote it and whatever dies next. The
senders (`runner.control.delivery`) claim rows with a conditional UPDATE of
`lease_until` (`claim_next`) and record each attempt fenced by `attempts`
(`record_attempt`), so two senders never send one delivery at the same moment and a
slow one's late outcome changes nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import DateTime, Integer, String, and_, insert, literal, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from runner.control.models import ArtifactRow, RunRow, WebhookDeliveryRow
from runner.control.reports import HasSessions
from runner.control.rows import aware, run_from_row
from runner.control.webhooks import EVENT
from runner.domain import Artifact, Run

LAST_ERROR_CHARS = 500
# Before its run ends a run's webhook has no delivery yet: the view says so.
WAITING = "waiting"


class DeliveryState(StrEnum):
    PENDING = "pending"      # to be sent: first try, or waiting out a backoff
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"        # no 2xx within RUNNER_WEBHOOK_RETRY_SECONDS


def _changed(session: Session, statement: Any) -> int:
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def _new_id() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def record_end(session: Session, run_id: str, now: datetime) -> None:
    """The delivery of the run's end, inside the transaction that writes it: one
    INSERT ... SELECT that inserts nothing for a run without a webhook_url."""
    stamp = literal(now, DateTime(timezone=True))
    chosen = select(literal(_new_id(), String()), RunRow.id, RunRow.webhook_url,
                    literal(EVENT, String()), literal(DeliveryState.PENDING.value, String()),
                    literal(0, Integer()), stamp, stamp
                    ).where(RunRow.id == run_id, RunRow.webhook_url.is_not(None))
    session.execute(insert(WebhookDeliveryRow).from_select(
        ["id", "run_id", "url", "event", "state", "attempts", "next_attempt_at",
         "created_at"], chosen))


def outbox_row(run_id: str, url: str, now: datetime) -> WebhookDeliveryRow:
    """The delivery of a run created already ended (a reuse hit), for its insert."""
    return WebhookDeliveryRow(id=_new_id(), run_id=run_id, url=url, event=EVENT,
                              state=DeliveryState.PENDING.value, attempts=0,
                              next_attempt_at=now, created_at=now)


@dataclass(frozen=True)
class Delivery:
    """A delivery a sender has claimed (until `lease_until`)."""

    id: str
    run_id: str
    url: str
    attempts: int
    created_at: datetime
    lease_until: datetime


def claim_next(store: HasSessions, *, now: datetime, lease_seconds: float,
               look: int = 8) -> Delivery | None:
    """Claim the most overdue unclaimed pending delivery, or None when none is due.

    A candidate is taken by one conditional UPDATE (still pending, same attempts,
    no live lease): of senders racing for it exactly one wins, the others try the next.
    """
    free = or_(WebhookDeliveryRow.lease_until.is_(None), WebhookDeliveryRow.lease_until < now)
    pending = WebhookDeliveryRow.state == DeliveryState.PENDING.value
    with store.session() as session:
        due = session.execute(
            select(WebhookDeliveryRow.id, WebhookDeliveryRow.run_id, WebhookDeliveryRow.url,
                   WebhookDeliveryRow.attempts, WebhookDeliveryRow.created_at)
            .where(pending, WebhookDeliveryRow.next_attempt_at <= now, free)
            .order_by(WebhookDeliveryRow.next_attempt_at, WebhookDeliveryRow.id)
            .limit(look)).all()
    lease = now + timedelta(seconds=lease_seconds)
    for row_id, run_id, url, attempts, created_at in due:
        with store.session() as session:
            if _changed(session, update(WebhookDeliveryRow).where(
                    WebhookDeliveryRow.id == row_id, pending, free,
                    WebhookDeliveryRow.attempts == attempts,
            ).values(lease_until=lease).execution_options(synchronize_session=False)) == 1:
                return Delivery(row_id, run_id, url, attempts,
                                aware(created_at) or now, lease)
    return None


def record_attempt(store: HasSessions, delivery: Delivery, *, state: DeliveryState,
                   now: datetime, status_code: int | None = None, error: str | None = None,
                   next_attempt_at: datetime | None = None) -> bool:
    """Write how one attempt of a claimed delivery went, and release the claim; False
    (nothing written) when another sender recorded an attempt of it meanwhile."""
    values: dict[str, Any] = {
        "state": state.value, "attempts": WebhookDeliveryRow.attempts + 1,
        "last_status_code": status_code, "lease_until": None,
        "last_error": error[:LAST_ERROR_CHARS] if error else None}
    if state is DeliveryState.DELIVERED:
        values["delivered_at"] = now
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    with store.session() as session:
        return _changed(session, update(WebhookDeliveryRow).where(
            WebhookDeliveryRow.id == delivery.id,
            WebhookDeliveryRow.state == DeliveryState.PENDING.value,
            WebhookDeliveryRow.attempts == delivery.attempts,
        ).values(**values).execution_options(synchronize_session=False)) == 1


def ended_run(store: HasSessions, run_id: str) -> tuple[Run, list[Artifact]] | None:
    """The run a delivery tells about, with its last attempt's artifacts (None: gone)."""
    with store.session() as session:
        row = session.get(RunRow, run_id)
        if row is None:
            return None
        run = run_from_row(row)
        found = session.scalars(select(ArtifactRow).where(
            ArtifactRow.run_id == run_id, ArtifactRow.attempt == run.attempt)
            .order_by(ArtifactRow.name))
        return run, [Artifact(a.name, a.size, a.sha256, a.media_type) for a in found]


@dataclass(frozen=True)
class WebhookStatus:
    """A run's webhook as the run object shows it."""

    url: str
    state: str  # WAITING, or a DeliveryState
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None


def webhook_status(store: HasSessions, run_id: str) -> WebhookStatus | None:
    """The run's webhook and how its delivery goes; None for a run without one."""
    with store.session() as session:
        found = session.execute(
            select(RunRow.webhook_url, WebhookDeliveryRow)
            .outerjoin(WebhookDeliveryRow, and_(WebhookDeliveryRow.run_id == RunRow.id,
                                                WebhookDeliveryRow.event == EVENT))
            .where(RunRow.id == run_id)).first()
        if found is None or found[0] is None:
            return None
        url, row = found
        if row is None:
            return WebhookStatus(url=url, state=WAITING)
        pending = row.state == DeliveryState.PENDING.value
        return WebhookStatus(
            url=row.url, state=row.state, attempts=row.attempts,
            last_status_code=row.last_status_code, last_error=row.last_error,
            next_attempt_at=aware(row.next_attempt_at) if pending else None,
            delivered_at=aware(row.delivered_at))


def webhook_url_of(store: HasSessions, run_id: str) -> str | None:
    """The webhook_url a run was submitted with (a replay carries it on)."""
    with store.session() as session:
        url: str | None = session.scalar(select(RunRow.webhook_url)
                                         .where(RunRow.id == run_id))
        return url
