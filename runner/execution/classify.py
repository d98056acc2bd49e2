"""How a container's end becomes an attempt's end: pure, no I/O.

A processor's failure arrives from the sandbox as data (`Outcome`); `classify` names
it with the contract's status and error code. The worker and `runner processor run`
both use it, so a local run is judged exactly as production judges it.
"""

from __future__ import annotations

import json

from runner.domain import ErrorCode, Finish, RunStatus
from runner.sandbox import Outcome, ResultStatus


def _failure(outcome: Outcome) -> tuple[RunStatus, ErrorCode, str] | None:
    """Why a container's end is not a success, or None when it is one."""
    result = outcome.result
    if outcome.timed_out:
        return (RunStatus.TIMED_OUT, ErrorCode.TIMEOUT,
                "the processor did not finish before its timeout")
    if outcome.oom_killed:
        return (RunStatus.FAILED, ErrorCode.OOM_KILLED,
                "the processor was killed for exceeding its memory limit")
    if outcome.exit_code != 0:
        return (RunStatus.FAILED, ErrorCode.NONZERO_EXIT,
                f"the processor exited with code {outcome.exit_code}")
    if result.status is ResultStatus.TOO_LARGE:
        return (RunStatus.FAILED, ErrorCode.OUTPUT_TOO_LARGE,
                f"result.json is {result.size} bytes, over the cap")
    if result.status in (ResultStatus.SYMLINK, ResultStatus.NOT_REGULAR):
        return (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT,
                f"result.json is not a regular file ({result.status})")
    return None


def classify(outcome: Outcome) -> Finish:
    """The terminal record for a container's end (pure: no I/O)."""
    failure = _failure(outcome)
    value = None
    if failure is None and outcome.result.status is ResultStatus.OK:
        try:
            value = json.loads(outcome.result.data or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            failure = (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT,
                       f"result.json is not JSON: {exc}")
    if failure is None:
        return Finish(RunStatus.SUCCEEDED, exit_code=outcome.exit_code, result=value,
                      log_bytes=outcome.log_bytes, log_truncated=outcome.log_truncated)
    status, code, message = failure
    stage = "collect" if code in (ErrorCode.INVALID_OUTPUT, ErrorCode.OUTPUT_TOO_LARGE) else "run"
    return Finish(status, exit_code=outcome.exit_code, error_code=code, error_message=message,
                  error_stage=stage, log_bytes=outcome.log_bytes,
                  log_truncated=outcome.log_truncated)
