"""Statuses and error codes shared by every part of the runner (see CONTRACT.md)."""

from __future__ import annotations

from enum import StrEnum


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
