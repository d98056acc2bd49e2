"""The executor's classification of a container's end: pure logic, no Docker."""

import pytest

from runner.domain import ErrorCode, RunStatus
from runner.execution.executor import classify
from runner.sandbox import CollectedResult, Outcome, ResultStatus


def outcome(**changes: object) -> Outcome:
    fields: dict[str, object] = dict(
        container_id="c", image_id="i", exit_code=0, oom_killed=False, timed_out=False,
        duration_seconds=0.1, log_bytes=10, log_truncated=False,
        result=CollectedResult(ResultStatus.ABSENT))
    fields.update(changes)
    return Outcome(**fields)  # type: ignore[arg-type]


def test_success_with_result() -> None:
    finish = classify(outcome(result=CollectedResult(ResultStatus.OK, b'{"a": 1}', 8)))
    assert finish.status is RunStatus.SUCCEEDED
    assert finish.result == {"a": 1}
    assert finish.error_code is None


def test_success_without_result() -> None:
    finish = classify(outcome())
    assert (finish.status, finish.result) == (RunStatus.SUCCEEDED, None)


def test_timeout_wins_over_exit_code() -> None:
    finish = classify(outcome(exit_code=143, timed_out=True))
    assert (finish.status, finish.error_code) == (RunStatus.TIMED_OUT, ErrorCode.TIMEOUT)


def test_oom() -> None:
    finish = classify(outcome(exit_code=137, oom_killed=True))
    assert (finish.status, finish.error_code) == (RunStatus.FAILED, ErrorCode.OOM_KILLED)


def test_nonzero_exit_keeps_code() -> None:
    finish = classify(outcome(exit_code=3))
    assert (finish.status, finish.error_code, finish.exit_code) == (
        RunStatus.FAILED, ErrorCode.NONZERO_EXIT, 3)


@pytest.mark.parametrize(("status", "code"), [
    (ResultStatus.SYMLINK, ErrorCode.INVALID_OUTPUT),
    (ResultStatus.NOT_REGULAR, ErrorCode.INVALID_OUTPUT),
    (ResultStatus.TOO_LARGE, ErrorCode.OUTPUT_TOO_LARGE),
])
def test_refused_results(status: ResultStatus, code: ErrorCode) -> None:
    finish = classify(outcome(result=CollectedResult(status, None, 5)))
    assert (finish.status, finish.error_code, finish.result) == (RunStatus.FAILED, code, None)


def test_result_that_is_not_json() -> None:
    finish = classify(outcome(result=CollectedResult(ResultStatus.OK, b"nope", 4)))
    assert (finish.status, finish.error_code) == (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT)
