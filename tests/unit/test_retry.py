"""Retry decisions and the state machine table: pure logic."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from runner.control.lifecycle import ALLOWED, sources
from runner.control.retry import backoff_seconds, decide, failure_class
from runner.domain import ErrorCode, Finish, RunStatus
from runner.manifest import RetryPolicy

NOW = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, backoff_initial_seconds=1, backoff_max_seconds=4,
                     on=frozenset({"exit:75", "timeout", "worker_lost"}))


def failed(code: ErrorCode, exit_code: int | None = None,
           status: RunStatus = RunStatus.FAILED) -> Finish:
    return Finish(status, error_code=code, exit_code=exit_code, error_message="x")


def test_failure_classes() -> None:
    assert failure_class(failed(ErrorCode.NONZERO_EXIT, 75)) == "exit:75"
    assert failure_class(failed(ErrorCode.TIMEOUT)) == "timeout"


def test_retryable_failure_is_queued_after_a_backoff() -> None:
    decided = decide(failed(ErrorCode.NONZERO_EXIT, 75), policy=POLICY, attempt=1, now=NOW,
                     rng=random.Random(1))
    assert decided.status is RunStatus.QUEUED
    assert decided.next_attempt_at is not None
    assert NOW <= decided.next_attempt_at <= NOW + timedelta(seconds=1)


def test_exhausted_retries_are_dead_letters() -> None:
    decided = decide(failed(ErrorCode.TIMEOUT, status=RunStatus.TIMED_OUT), policy=POLICY,
                     attempt=3, now=NOW)
    assert decided.status is RunStatus.DEAD_LETTER
    assert "retries exhausted after 3 attempts" in (decided.error_message or "")


@pytest.mark.parametrize(("finish", "status"), [
    (failed(ErrorCode.NONZERO_EXIT, 1), RunStatus.FAILED),
    (failed(ErrorCode.OOM_KILLED), RunStatus.FAILED),
    (failed(ErrorCode.IMAGE_NOT_ALLOWED), RunStatus.DEAD_LETTER),
    (failed(ErrorCode.DIGEST_MISMATCH), RunStatus.DEAD_LETTER),
    (Finish(RunStatus.SUCCEEDED), RunStatus.SUCCEEDED),
    (Finish(RunStatus.CANCELED, error_code=ErrorCode.CANCELED), RunStatus.CANCELED),
])
def test_not_retried(finish: Finish, status: RunStatus) -> None:
    assert decide(finish, policy=POLICY, attempt=1, now=NOW).status is status


def test_single_attempt_policy_keeps_the_classified_status() -> None:
    decided = decide(failed(ErrorCode.TIMEOUT, status=RunStatus.TIMED_OUT),
                     policy=RetryPolicy(), attempt=1, now=NOW)
    assert decided.status is RunStatus.TIMED_OUT


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt, ceiling in ((1, 1), (2, 2), (3, 4), (4, 4), (10, 4)):
        samples = [backoff_seconds(POLICY, attempt, rng=rng) for _ in range(200)]
        assert min(samples) >= 0 and max(samples) <= ceiling
        assert max(samples) > ceiling * 0.8  # it really spreads up to the ceiling


def test_terminal_states_have_no_way_out() -> None:
    for status in RunStatus:
        assert (ALLOWED[status] == frozenset()) == status.terminal
    assert sources(RunStatus.RUNNING) == ["queued"]
    assert set(sources(RunStatus.CANCELED)) == {"queued", "running"}
    assert sources(RunStatus.SUCCEEDED) == ["running"]
