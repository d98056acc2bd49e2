"""The executor's classification of a container's end: pure logic, no Docker."""

import importlib.util
import math
from pathlib import Path

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


@pytest.mark.parametrize(("data", "why"), [
    (b'{"x": NaN}', "NaN is not a JSON value"),
    (b'{"x": Infinity}', "Infinity is not a JSON value"),
    (b'[1, -Infinity]', "-Infinity is not a JSON value"),
    (b'{"x": 1e999}', "1e999 is out of range"),
    (b'{"x": -1e999}', "-1e999 is out of range"),
    (b'{"x": 9223372036854775808}', "outside the 64-bit range"),
    (b'{"x": -9223372036854775809}', "outside the 64-bit range"),
    (b'{"x": ' + b"7" * 5000 + b"}", "5000 digits is too long"),
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 128 levels"),
    (b"[" * 129 + b"]" * 129, "nested more than 128 levels"),
], ids=["nan", "infinity", "-infinity", "1e999", "-1e999", "2**63", "-2**63-1",
        "5000-digits", "deep", "129-levels"])
def test_result_that_is_not_strict_json_is_invalid_output(data: bytes, why: str) -> None:
    """Python's json reads all of these; none is a value every store and client reads
    back (PostgreSQL refuses NaN, SQLite would store it and serve invalid JSON)."""
    finish = classify(outcome(result=CollectedResult(ResultStatus.OK, data, len(data))))
    assert (finish.status, finish.error_code, finish.result) == (
        RunStatus.FAILED, ErrorCode.INVALID_OUTPUT, None)
    assert finish.error_stage == "collect"
    assert finish.error_message is not None
    assert finish.error_message.startswith("result.json is not strict JSON: ")
    assert why in finish.error_message


def test_strict_json_at_the_edges_still_succeeds() -> None:
    data = (b'{"max": 9223372036854775807, "min": -9223372036854775808, "f": 1.5e308,'
            b' "tiny": 1e-400, "s": "NaN", "n": null, "deep": ' + b"[" * 127 + b"]" * 127
            + b"}")
    finish = classify(outcome(result=CollectedResult(ResultStatus.OK, data, len(data))))
    assert finish.status is RunStatus.SUCCEEDED, finish.error_message
    assert finish.result["max"] == 2**63 - 1 and finish.result["min"] == -(2**63)
    assert finish.result["s"] == "NaN" and finish.result["tiny"] == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_python_template_refuses_to_write_a_non_strict_result(
        bad: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper Python processors use raises in the processor, with a clear message,
    instead of writing a file the runner then refuses as invalid_output."""
    source = Path(__file__).resolve().parents[2] / "processor-templates/python/runner_processor.py"
    spec = importlib.util.spec_from_file_location("runner_processor", source)
    assert spec is not None and spec.loader is not None
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    monkeypatch.setattr(helper, "RESULT_PATH", str(tmp_path / "result.json"))
    with pytest.raises(ValueError, match="not strict JSON") as caught:
        helper.write_result({"x": [1, bad]})
    assert "NaN and Infinity have no JSON form" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    helper.write_result({"x": 1.5})
    data = (tmp_path / "result.json").read_bytes()
    assert classify(outcome(result=CollectedResult(ResultStatus.OK, data, len(data)))).result == {
        "x": 1.5}
