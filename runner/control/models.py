"""Database tables (SQLAlchemy 2). The schema itself is owned by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    processor: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    image: Mapped[str] = mapped_column(String(512))
    queue: Mapped[str] = mapped_column(String(64))
    input: Mapped[Any] = mapped_column(JSON)
    result: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    timeout_seconds: Mapped[float] = mapped_column(Float)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    manifest_revision: Mapped[str | None] = mapped_column(String(80), nullable=True)
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    log_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # When a queued run may next start (backoff), and when its current lease ends.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                             nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                              nullable=True)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True)
    error_stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    replay_of: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # W3C traceparent of the request that submitted the run: every attempt continues it.
    traceparent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Set while a queued run waits for a free slot of its processor (max_concurrency):
    # a parked run is not enqueued; a slot's release wakes the oldest parked run.
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                       nullable=True)
    # The files that went in, {name: "sha256:<hex>"} (also rows of `run_files`).
    files: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    # A digest of what the run computes from (image digest, input, file hashes): a
    # succeeded run of the same tenant with the same key can stand in for a new one.
    reuse_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reused_from: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # Where the run's end is POSTed (runner/control/webhooks.py), checked at submission.
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    # high, normal or low: the order among the tenant's own queued runs (0009).
    priority: Mapped[str] = mapped_column(String(8), nullable=False, default="normal",
                                          server_default="normal")

    __table_args__ = (
        Index("ix_runs_tenant_id", "tenant", "id"),
        Index("ix_runs_tenant_status_id", "tenant", "status", "id"),
        Index("ix_runs_tenant_processor_id", "tenant", "processor", "id"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_processor_parked", "processor", "parked_at"),
        Index("ix_runs_tenant_reuse_key", "tenant", "reuse_key"),
        Index("ix_runs_tenant_finished_at", "tenant", "finished_at"),
        Index("ix_runs_finished_at", "finished_at"),
        UniqueConstraint("tenant", "idempotency_key", name="uq_runs_tenant_idempotency_key"),
    )


class SlotRow(Base):
    """One of a processor's `max_concurrency` slots, held by a running attempt.

    The unique (processor, slot) pair is what caps concurrency across all workers,
    on any database, without locks.
    """

    __tablename__ = "processor_slots"

    processor: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36))
    attempt: Mapped[int] = mapped_column(Integer)
    taken_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AttemptRow(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(128))
    # RUNNER_HOST_ID of the worker host that ran it (null before revision 0008).
    host_id: Mapped[str | None] = mapped_column(String(63), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    container_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    image_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error_stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What was asked of the engine and what it reports it applied (see sandbox.py).
    provenance: Mapped[Any | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (UniqueConstraint("run_id", "number", name="uq_attempts_run_number"),)


class LogChunkRow(Base):
    __tablename__ = "run_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_run_logs_run_offset", "run_id", "offset"),)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TenantRow(Base):
    """One row per tenant; locking it serialises quota checks across API processes."""

    __tablename__ = "tenants"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    touched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FileRow(Base):
    """An uploaded file: one row per tenant and content (the id is its SHA-256)."""

    __tablename__ = "files"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # Sniffed from the bytes; the client's Content-Type is kept beside it.
    media_type: Mapped[str] = mapped_column(String(255))
    declared_media_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Its last upload or submission with a run: retention counts from here.
    touched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_files_touched_at", "touched_at"),
                      Index("ix_files_sha256", "sha256"))


class RunFileRow(Base):
    """A file delivered to a run at /run/in/<name>: what keeps the file from retention."""

    __tablename__ = "run_files"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"),
                                        primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))

    __table_args__ = (Index("ix_run_files_tenant_sha256", "tenant", "sha256"),)


class ArtifactRow(Base):
    """A file an attempt left under /run/out, stored as a blob of its tenant."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(1024))
    tenant: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(255))

    __table_args__ = (Index("ix_artifacts_run_attempt", "run_id", "attempt"),
                      Index("ix_artifacts_sha256", "sha256"))


class BlobRow(Base):
    """A blob of the database file store (RUNNER_FILE_STORE=database). `key` is null
    while it is being written; set when it is committed (unique: stored once)."""

    __tablename__ = "blobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BlobChunkRow(Base):
    """One chunk of a database blob, in order of `seq`."""

    __tablename__ = "blob_chunks"

    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id", ondelete="CASCADE"),
                                         primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class WebhookDeliveryRow(Base):
    """One POST of a run's end to its webhook_url: the outbox row written in the same
    transaction as the final status, sent (and retried) by any process's sender.

    `lease_until` is a sender's claim: while it lies ahead no other sender takes the
    row. `attempts` fences the outcome's write, as a run's attempt number fences its end.
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    event: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                         nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                          nullable=True)

    __table_args__ = (
        Index("ix_webhook_deliveries_state_due", "state", "next_attempt_at"),
        UniqueConstraint("run_id", "event", name="uq_webhook_deliveries_run_event"),
    )
