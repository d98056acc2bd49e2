"""Rows to records: the one mapping from ORM rows to the frozen domain records.

Kept apart from `store` so every module of the control layer can turn rows into
`Run` snapshots without importing the store (which imports them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from runner.control.models import RunRow
from runner.domain import NewRun, Priority, Run, RunStatus, utcnow


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


def new_values(new: NewRun, webhook_url: str | None, run_id: str,
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


def snapshot(values: dict[str, Any]) -> Run:
    """The run just written, from its values (the columns not written are unset)."""
    unset = dict.fromkeys(("result", "exit_code", "error_code", "error_message",
                           "worker_id", "started_at", "finished_at", "next_attempt_at",
                           "lease_expires_at", "cancel_requested_at", "error_stage"))
    return run_from_row(cast(RunRow, SimpleNamespace(**{**unset, **values})))
