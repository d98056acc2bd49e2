"""Rows to records: the one mapping from ORM rows to the frozen domain records.

Kept apart from `store` so every module of the control layer can turn rows into
`Run` snapshots without importing the store (which imports them).
"""

from __future__ import annotations

from datetime import UTC, datetime

from runner.control.models import RunRow
from runner.domain import Priority, Run, RunStatus, utcnow


def aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def run_from_row(row: RunRow) -> Run:
    """A frozen snapshot of a run's row (no session leaks out)."""
    return Run(
        id=row.id, tenant=row.tenant, status=RunStatus(row.status),
        processor=row.processor, version=row.version, image=row.image, queue=row.queue,
        input=row.input, result=row.result, labels=dict(row.labels or {}),
        timeout_seconds=row.timeout_seconds, exit_code=row.exit_code,
        error_code=row.error_code, error_message=row.error_message, attempt=row.attempt,
        max_attempts=row.max_attempts, worker_id=row.worker_id,
        manifest_revision=row.manifest_revision, log_bytes=row.log_bytes,
        log_truncated=row.log_truncated, created_at=aware(row.created_at) or utcnow(),
        started_at=aware(row.started_at), finished_at=aware(row.finished_at),
        next_attempt_at=aware(row.next_attempt_at),
        lease_expires_at=aware(row.lease_expires_at),
        cancel_requested_at=aware(row.cancel_requested_at), error_stage=row.error_stage,
        replay_of=row.replay_of, idempotency_key=row.idempotency_key,
        request_hash=row.request_hash, traceparent=row.traceparent,
        files=dict(row.files or {}), reuse_key=row.reuse_key, reused_from=row.reused_from,
        priority=Priority(row.priority or Priority.NORMAL),
    )
