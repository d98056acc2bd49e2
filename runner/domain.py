"""What every layer shares: statuses, error codes, roles, and the run records.

`Run` is a frozen snapshot of a run as stored; `NewRun` what a submission records;
`Finish` how one attempt ended and what the run becomes. None of them knows the
database: `runner.control.store` maps rows to and from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    DEAD_LETTER = "dead_letter"

    @property
    def terminal(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)


class ErrorCode(StrEnum):
    NONZERO_EXIT = "nonzero_exit"
    OOM_KILLED = "oom_killed"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    IMAGE_NOT_ALLOWED = "image_not_allowed"
    IMAGE_PULL_FAILED = "image_pull_failed"
    DIGEST_MISMATCH = "digest_mismatch"
    # The engine reports limits or lockdown settings other than those asked for.
    SANDBOX_MISMATCH = "sandbox_mismatch"
    DOCKER_UNAVAILABLE = "docker_unavailable"
    WORKER_LOST = "worker_lost"
    INVALID_INPUT = "invalid_input"
    INVALID_OUTPUT = "invalid_output"
    OUTPUT_TOO_LARGE = "output_too_large"
    INTERNAL_ERROR = "internal_error"


class Role(StrEnum):
    VIEWER = "viewer"
    SUBMITTER = "submitter"
    ADMIN = "admin"


class Priority(StrEnum):
    """How a run is ordered among its own tenant's queued runs (tenants take turns
    regardless: runner/control/lanes.py)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


@dataclass(frozen=True)
class NewRun:
    tenant: str
    processor: str
    version: str
    image: str
    queue: str
    input: Any
    timeout_seconds: float
    max_attempts: int
    manifest_revision: str
    labels: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    request_hash: str | None = None
    replay_of: str | None = None
    traceparent: str | None = None
    # {name: "sha256:<hex>"}: delivered read-only at /run/in/<name>.
    files: dict[str, str] = field(default_factory=dict)
    reuse_key: str | None = None
    # A reuse hit: the run is recorded already succeeded, with this run's result and
    # artifacts (`Artifact` records), and never starts a container.
    reused_from: str | None = None
    result: Any = None
    artifacts: tuple[Artifact, ...] = ()
    priority: Priority = Priority.NORMAL


@dataclass(frozen=True)
class Artifact:
    """A file an attempt left under /run/out (name with "/" for subdirectories)."""

    name: str
    size: int
    sha256: str
    media_type: str

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256,
                "media_type": self.media_type}


@dataclass(frozen=True)
class Run:
    id: str
    tenant: str
    status: RunStatus
    processor: str
    version: str
    image: str
    queue: str
    input: Any
    result: Any
    labels: dict[str, str]
    timeout_seconds: float
    exit_code: int | None
    error_code: str | None
    error_message: str | None
    attempt: int
    max_attempts: int
    worker_id: str | None
    manifest_revision: str | None
    log_bytes: int
    log_truncated: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None = None
    lease_expires_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    error_stage: str | None = None
    replay_of: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    traceparent: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    reuse_key: str | None = None
    reused_from: str | None = None
    # The last attempt's artifacts, where the reader asked for them (else empty).
    artifacts: tuple[Artifact, ...] = ()
    priority: Priority = Priority.NORMAL


@dataclass(frozen=True)
class Finish:
    """How one attempt ended and what the run becomes (QUEUED when it will be retried)."""

    status: RunStatus
    exit_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_stage: str | None = None
    result: Any = None
    log_bytes: int = 0
    log_truncated: bool = False
    next_attempt_at: datetime | None = None
    # What the attempt left under /run/out, recorded with its end (one transaction).
    artifacts: tuple[Artifact, ...] = ()
