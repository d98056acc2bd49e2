"""How a container's end becomes an attempt's end: pure, no I/O.

A processor's failure arrives from the sandbox as data (`Outcome`); `classify` names
it with the contract's status and error code. The worker and `runner processor run`
both use it, so a local run is judged exactly as production judges it.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from runner.domain import Artifact, ErrorCode, Finish, RunStatus
from runner.sandbox import ArtifactStatus, Outcome, ResultStatus

# A result is stored and served as JSON, so it must be strict JSON (RFC 8259) that
# every store and client reads back the same: no NaN or Infinity (Python writes them,
# PostgreSQL's json type refuses them), no number that overflows a double (1e999),
# and integers within 64 bits (what PostgreSQL, Go, Java and most clients hold; a
# JavaScript client already rounds past 2**53). Longer digit strings than Python's
# int conversion allows are refused before any conversion work.
# Nesting is bounded too: the API's JSON encoder stops at 255 levels, so a deeper
# result would be stored and then fail every read of its run.
INT_MAX_DIGITS = 4300
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 128


class NotStrictJSON(ValueError):
    """The text parses as Python's JSON but is not strict JSON."""


def _no_constant(name: str) -> NoReturn:
    raise NotStrictJSON(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NotStrictJSON(f"the number {text[:40]} is out of range for a double")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > INT_MAX_DIGITS:  # never converted: the work grows with the square
        raise NotStrictJSON(f"an integer of {digits} digits is too long")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise NotStrictJSON(f"the integer {text[:40]}{'...' if len(text) > 40 else ''} "
                            "is outside the 64-bit range")
    return value


def parse_result(data: bytes) -> Any:
    """`result.json` as a value, if it is strict JSON.

    Raises:
        NotStrictJSON: JSON as Python reads it, but not strict: NaN, Infinity, a
            number out of range, nesting too deep to read; the message says why.
        ValueError: not UTF-8, or not JSON at all.
    """
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite,
                           parse_int=_bounded_int)
    except RecursionError:
        raise NotStrictJSON(f"it is nested more than {MAX_DEPTH} levels deep") from None
    _check_depth(value)
    return value


def _check_depth(value: Any) -> None:
    """Raises: NotStrictJSON when arrays and objects nest over MAX_DEPTH levels."""
    level: list[Any] = [value]
    for _ in range(MAX_DEPTH):
        level = [child for item in level if isinstance(item, list | dict)
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return
    if any(isinstance(item, list | dict) for item in level):
        raise NotStrictJSON(f"it is nested more than {MAX_DEPTH} levels deep")


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
    artifacts = outcome.artifacts
    if artifacts.status is ArtifactStatus.INVALID:
        return (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT,
                f"/run/out holds what cannot be an artifact: {artifacts.problem}")
    if artifacts.status is ArtifactStatus.TOO_LARGE:
        return (RunStatus.FAILED, ErrorCode.OUTPUT_TOO_LARGE,
                f"the artifacts are over their cap: {artifacts.problem}")
    return None


def kept_artifacts(outcome: Outcome) -> tuple[Artifact, ...]:
    """The artifacts an attempt's end records: all of a collection that passed, none of
    one that did not (nothing of it is half-kept)."""
    if outcome.artifacts.status is not ArtifactStatus.OK:
        return ()
    return tuple(Artifact(a.name, a.size, a.sha256, a.media_type)
                 for a in outcome.artifacts.items)


def classify(outcome: Outcome) -> Finish:
    """The terminal record for a container's end (pure: no I/O)."""
    failure = _failure(outcome)
    value = None
    if failure is None and outcome.result.status is ResultStatus.OK:
        try:
            value = parse_result(outcome.result.data or b"")
        except NotStrictJSON as exc:
            failure = (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT,
                       f"result.json is not strict JSON: {exc}")
        except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, int limits
            failure = (RunStatus.FAILED, ErrorCode.INVALID_OUTPUT,
                       f"result.json is not JSON: {exc}")
    artifacts = kept_artifacts(outcome)
    if failure is None:
        return Finish(RunStatus.SUCCEEDED, exit_code=outcome.exit_code, result=value,
                      log_bytes=outcome.log_bytes, log_truncated=outcome.log_truncated,
                      artifacts=artifacts)
    status, code, message = failure
    stage = "collect" if code in (ErrorCode.INVALID_OUTPUT, ErrorCode.OUTPUT_TOO_LARGE) else "run"
    return Finish(status, exit_code=outcome.exit_code, error_code=code, error_message=message,
                  error_stage=stage, log_bytes=outcome.log_bytes,
                  log_truncated=outcome.log_truncated, artifacts=artifacts)
