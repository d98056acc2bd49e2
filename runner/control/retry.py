"""Retry decisions from the manifest's policy: pure functions, no I/O."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta

from runner.domain import ErrorCode, Finish, RunStatus
from runner.manifest import RetryPolicy

# Failures that stop the platform itself from running the processor; when the
# policy does not retry them (or retries run out) they end as dead letters.
PLATFORM_FAILURES = frozenset({
    ErrorCode.IMAGE_NOT_ALLOWED, ErrorCode.IMAGE_PULL_FAILED, ErrorCode.DIGEST_MISMATCH,
    ErrorCode.SANDBOX_MISMATCH,
    ErrorCode.DOCKER_UNAVAILABLE, ErrorCode.WORKER_LOST, ErrorCode.INTERNAL_ERROR,
})


def failure_class(finish: Finish) -> str | None:
    """The name a policy's `on:` list uses for this failure (`exit:75`, `timeout`...)."""
    if finish.error_code == ErrorCode.NONZERO_EXIT:
        return f"exit:{finish.exit_code}"
    return finish.error_code


def backoff_seconds(policy: RetryPolicy, attempt: int, *, rng: random.Random | None = None
                    ) -> float:
    """Full-jitter exponential backoff before attempt `attempt + 1`.

    Uniform in [0, min(max, initial * 2^(attempt-1))], so retries of many runs that
    failed together spread out instead of stampeding.
    """
    ceiling = min(policy.backoff_max_seconds,
                  policy.backoff_initial_seconds * (2 ** max(attempt - 1, 0)))
    return (rng or random).uniform(0, ceiling)


def decide(finish: Finish, *, policy: RetryPolicy, attempt: int, now: datetime,
           rng: random.Random | None = None) -> Finish:
    """Turn an attempt's end into the run's next state: retry, dead letter, or as is."""
    if finish.status in (RunStatus.SUCCEEDED, RunStatus.CANCELED):
        return finish
    retryable = failure_class(finish) in policy.on
    if retryable and attempt < policy.max_attempts:
        delay = backoff_seconds(policy, attempt, rng=rng)
        return replace(finish, status=RunStatus.QUEUED,
                       next_attempt_at=now + timedelta(seconds=delay))
    if retryable and policy.max_attempts > 1:
        message = f"{finish.error_message} (retries exhausted after {attempt} attempts)"
        return replace(finish, status=RunStatus.DEAD_LETTER, error_message=message)
    if finish.error_code in PLATFORM_FAILURES:
        return replace(finish, status=RunStatus.DEAD_LETTER)
    return finish
