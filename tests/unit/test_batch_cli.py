"""Batches from the client's side: `RunnerClient.submit_many` and `runner submit --batch`,
against httpx.MockTransport (typer's CliRunner for the command).

Pure logic only: how lines are read and refused, how keys are derived, how items are
chunked and resent. The real endpoint is exercised by tests/integration/test_batch_client.py.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from runner.cli import app
from runner.cli import runs as runs_cli
from runner.client import BatchInterruptedError, RunnerClient, chunked
from runner.errors import RunnerError

cli = CliRunner()


class BatchApi:
    """A tiny POST /v1/runs/batch: an item whose input has "bad" is refused, the others
    become queued runs (named by their idempotency key when they have one). `answers`
    are given first, one per request, before the normal behaviour."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.bodies: list[dict[str, Any]] = []
        self.made = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if request.url.path == "/v1/runs":
            return httpx.Response(202, json={"id": "run-single", "status": "queued", **body})
        assert request.url.path == "/v1/runs/batch"
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return httpx.Response(202, json={"items": [self.entry(item) for item in body["runs"]]})

    def entry(self, item: dict[str, Any]) -> dict[str, Any]:
        if "bad" in item["input"]:
            return {"error": {"code": "invalid_input", "message": "bad", "field": "input"}}
        self.made += 1
        return {"id": item.get("idempotency_key", f"run-{self.made}"), "status": "queued",
                "input": item["input"]}

    @property
    def items(self) -> list[dict[str, Any]]:
        """Every item sent, in order, over all batch requests."""
        return [item for body in self.bodies for item in body.get("runs", [])]


def refusal(status: int, code: str, field: str | None = None,
            retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(status, headers=headers, json={"error": {
        "code": code, "message": f"{code} here", "request_id": "r", "field": field}})


def client_for(api: BatchApi) -> RunnerClient:
    return RunnerClient("http://api.test", "key", transport=httpx.MockTransport(api))


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's waits, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    return waits


# Reading lines, deriving keys, chunking ------------------------------------------

def lines_of(text: bytes) -> list[tuple[int, dict[str, Any]]]:
    return list(runs_cli.batch_lines(io.BytesIO(text)))


def test_each_non_blank_line_is_one_input_numbered_as_in_the_file() -> None:
    text = b'\xef\xbb\xbf{"a": 1}\n\n   \n{"b": [2]}\r\n{"c": "\xc3\xa9"}'
    assert lines_of(text) == [(1, {"a": 1}), (4, {"b": [2]}), (5, {"c": "é"})]


@pytest.mark.parametrize(("text", "says"), [
    (b'{"a": 1}\n\n[1, 2]\n', "line 3: not a JSON object"),
    (b'{"a": 1}\n{"a": \n', "line 2: not JSON"),
    (b'"just a string"\n', "line 1: not a JSON object"),
    (b'{"a": 1}\n{"a": "\xff"}\n', "line 2: not UTF-8"),
    (b'{"n": ' + b"9" * 5000 + b"}\n", "line 1: not JSON"),
])
def test_a_line_that_is_not_a_json_object_is_named_by_its_number(text: bytes,
                                                                  says: str) -> None:
    with pytest.raises(RunnerError) as caught:
        lines_of(text)
    assert caught.value.message.startswith(says)


def test_a_line_key_is_the_key_then_the_line_number() -> None:
    assert runs_cli.line_key("nightly-7", 1) == "nightly-7:1"
    assert runs_cli.line_key("nightly-7", 10000) == "nightly-7:10000"
    assert runs_cli.line_key(None, 3) is None


def test_labels_are_key_value_pairs_each_key_once() -> None:
    assert runs_cli.parse_labels(["team=ml", "note=a=b", "empty="]) == {
        "team": "ml", "note": "a=b", "empty": ""}
    for bad in (["team"], ["=ml"], ["a=1", "a=2"]):
        with pytest.raises(Exception) as caught:
            runs_cli.parse_labels(bad)
        assert type(caught.value).__name__ == "Exit"


def test_chunks_are_read_one_at_a_time_and_keep_the_order() -> None:
    pulled: list[int] = []

    def numbers() -> Iterator[int]:
        for n in range(7):
            pulled.append(n)
            yield n

    chunks = chunked(numbers(), 3)
    assert next(chunks) == [0, 1, 2] and pulled == [0, 1, 2]
    assert list(chunks) == [[3, 4, 5], [6]]
    assert list(chunked([], 3)) == []
    with pytest.raises(ValueError):
        next(chunked([1], 0))


# RunnerClient.submit_many -----------------------------------------------------------

def test_submit_many_sends_chunks_and_answers_every_item_in_order() -> None:
    api = BatchApi()
    items = [{"processor": "echo", "input": {"bad": 1} if n % 4 == 0 else {"n": n}}
             for n in range(1, 11)]
    seen: list[tuple[int, int | None]] = []
    with client_for(api) as client:
        results = client.submit_many(items, chunk_size=4,
                                     on_progress=lambda done, total: seen.append((done, total)))
    assert [len(body["runs"]) for body in api.bodies] == [4, 4, 2]
    assert api.items == items  # as given: nothing added, no key made up
    assert [r.get("input", {}).get("n") for r in results] == [1, 2, 3, None, 5, 6, 7, None,
                                                               9, 10]
    assert [r["error"]["code"] for r in results if "error" in r] == ["invalid_input"] * 2
    assert seen == [(4, 10), (8, 10), (10, 10)]


def test_submit_many_holds_no_more_than_one_chunk_of_a_stream() -> None:
    pulled = 0
    api = BatchApi()

    def items() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for n in range(2500):
            pulled += 1
            yield {"processor": "echo", "input": {"n": n}}

    ahead: list[int] = []
    with client_for(api) as client:
        results = client.submit_many(
            items(), chunk_size=1000,
            on_progress=lambda done, total: ahead.append(pulled - done))
    assert len(results) == 2500 and [len(b["runs"]) for b in api.bodies] == [1000, 1000, 500]
    assert max(ahead) == 0  # each chunk was answered before the next was read
    with pytest.raises(ValueError):
        client.submit_many([], chunk_size=1001)


def test_a_chunk_refused_whole_with_429_is_sent_again_after_retry_after(
        slept: list[float]) -> None:
    api = BatchApi(refusal(429, "rate_limited", retry_after="7"),
                   refusal(429, "rate_limited", retry_after="3600"))
    items = [{"processor": "echo", "input": {"n": n}, "idempotency_key": f"k:{n}"}
             for n in range(3)]
    with client_for(api) as client:
        results = client.submit_many(items, chunk_size=2)
    assert slept == [7.0, 60.0]  # a wait is bounded, whatever the server says
    assert [r["id"] for r in results] == ["k:0", "k:1", "k:2"]
    first, again, third, last = api.bodies
    assert first == again == third == {"runs": items[:2]} and last == {"runs": items[2:]}


def test_past_its_patience_the_batch_stops_with_what_was_answered(
        slept: list[float]) -> None:
    api = BatchApi(httpx.Response(202, json={"items": [{"id": "a", "status": "queued"}]}),
                   *[refusal(429, "rate_limited", retry_after="30")] * 5)
    with client_for(api) as client, pytest.raises(BatchInterruptedError) as caught:
        client.submit_many([{"processor": "echo", "input": {}}] * 3, chunk_size=1,
                           patience=100)
    assert slept == [30.0, 30.0, 30.0]
    assert caught.value.results == [{"id": "a", "status": "queued"}]
    assert getattr(caught.value.cause, "status", None) == 429
    assert "stopped after 1 item:" in caught.value.message


def test_a_lost_answer_is_not_resent(slept: list[float]) -> None:
    api = BatchApi(httpx.Response(202, json={"items": [{"id": "a", "status": "queued"}]}),
                   httpx.ReadError("connection reset"))
    with client_for(api) as client, pytest.raises(BatchInterruptedError) as caught:
        client.submit_many([{"processor": "echo", "input": {}}] * 3, chunk_size=1)
    assert len(api.bodies) == 2 and slept == []
    assert [r["id"] for r in caught.value.results] == ["a"]
    assert "cannot reach the API" in caught.value.cause.message


def test_a_chunk_over_the_servers_cap_is_sent_in_halves(slept: list[float]) -> None:
    api = BatchApi(refusal(422, "invalid_request", field="runs"),
                   refusal(422, "invalid_request", field="runs"))
    items = [{"processor": "echo", "input": {"n": n}} for n in range(9)]
    with client_for(api) as client:
        results = client.submit_many(items, chunk_size=8)
    assert [len(b["runs"]) for b in api.bodies] == [8, 4, 2, 2, 2, 2, 1]
    assert [r["input"]["n"] for r in results] == list(range(9))


def test_an_item_refused_whole_at_size_one_stops_the_batch() -> None:
    api = BatchApi(*[refusal(422, "invalid_request", field="runs")] * 2)
    with client_for(api) as client, pytest.raises(BatchInterruptedError) as caught:
        client.submit_many([{"processor": "echo", "input": {}}] * 2, chunk_size=2)
    assert caught.value.results == [] and len(api.bodies) == 2


def test_an_answer_of_the_wrong_length_stops_the_batch() -> None:
    api = BatchApi(httpx.Response(202, json={"items": []}))
    with client_for(api) as client, pytest.raises(BatchInterruptedError) as caught:
        client.submit_many([{"processor": "echo", "input": {}}])
    assert "not 1 items" in caught.value.message


def test_submit_sends_a_priority() -> None:
    api = BatchApi()
    with client_for(api) as client:
        client.submit("echo", {}, priority="high")
        client.submit("echo", {})
    assert api.bodies[0]["priority"] == "high" and "priority" not in api.bodies[1]


# runner submit --batch -------------------------------------------------------------

@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> BatchApi:
    fake = BatchApi()
    make: Callable[[], Any] = lambda: client_for(fake)  # noqa: E731
    monkeypatch.setattr(runs_cli, "api_client", make)
    return fake


def jsonl(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def output(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_batch_prints_a_line_per_input_line_and_applies_the_options_to_each(
        api: BatchApi, tmp_path: Path) -> None:
    path = jsonl(tmp_path, '{"message": "a"}', "", '{"message": "b"}')
    result = cli.invoke(app, ["submit", "echo", "--batch", str(path), "--version", "1.0.0",
                              "--timeout", "9", "--label", "team=ml", "--priority", "low",
                              "--webhook-url", "https://hooks.test/x", "--reuse-max-age",
                              "1h", "--idempotency-key", "nightly"])
    assert result.exit_code == 0, result.output
    assert output(result.stdout) == [{"line": 1, "id": "nightly:1", "status": "queued"},
                                     {"line": 3, "id": "nightly:3", "status": "queued"}]
    assert result.stderr.strip() == "submitted 2 of 2 runs"
    common = {"processor": "echo", "version": "1.0.0", "timeout_seconds": 9,
              "labels": {"team": "ml"}, "priority": "low", "reuse": {"max_age": "1h"},
              "webhook_url": "https://hooks.test/x"}
    assert api.items == [{**common, "input": {"message": "a"}, "idempotency_key": "nightly:1"},
                         {**common, "input": {"message": "b"}, "idempotency_key": "nightly:3"}]


def test_a_refused_line_is_reported_and_the_batch_exits_1(api: BatchApi,
                                                         tmp_path: Path) -> None:
    path = jsonl(tmp_path, '{"n": 1}', '{"bad": true}', '{"n": 3}')
    result = cli.invoke(app, ["submit", "echo", "--batch", str(path)])
    assert result.exit_code == 1
    printed = output(result.stdout)
    assert [p["line"] for p in printed] == [1, 2, 3]
    assert printed[1] == {"line": 2, "error": {"code": "invalid_input", "message": "bad",
                                               "field": "input"}}
    assert "idempotency_key" not in api.items[0]  # no key given, none made up
    assert result.stderr.strip() == "submitted 2 of 3 runs; 1 refused"


def test_a_bad_line_refuses_the_whole_file_before_anything_is_sent(
        api: BatchApi, tmp_path: Path) -> None:
    path = jsonl(tmp_path, *['{"n": 1}'] * 600, "[1]", '{"n": 2}')
    result = cli.invoke(app, ["submit", "echo", "--batch", str(path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"error: --batch {path}: line 601: not a JSON object "
                                     "(each line is one run's input); nothing was sent")
    assert api.bodies == []


@pytest.mark.parametrize("extra", [["--input", "{}"], ["--follow"], ["--file", "a=b"]])
def test_batch_cannot_be_combined_with_input_file_or_follow(
        api: BatchApi, tmp_path: Path, extra: list[str]) -> None:
    result = cli.invoke(app, ["submit", "echo", "--batch", str(jsonl(tmp_path, "{}")),
                              *extra])
    assert result.exit_code == 1 and api.bodies == []
    assert result.stderr.strip() == ("error: --batch takes each run's input from its line: "
                                     "it cannot be combined with --input, --file or --follow")


def test_a_batch_of_ten_thousand_lines_goes_up_in_chunks(api: BatchApi,
                                                         tmp_path: Path) -> None:
    path = jsonl(tmp_path, *[json.dumps({"n": n}) for n in range(10_000)])
    result = cli.invoke(app, ["submit", "echo", "--batch", str(path), "--chunk-size", "500",
                              "--idempotency-key", "big"])
    assert result.exit_code == 0, result.stderr
    assert [len(body["runs"]) for body in api.bodies] == [500] * 20
    printed = output(result.stdout)
    assert [p["line"] for p in printed] == list(range(1, 10_001))
    assert printed[-1]["id"] == "big:10000"
    assert result.stderr.strip() == "submitted 10000 of 10000 runs"


def test_batch_reads_stdin(api: BatchApi) -> None:
    result = cli.invoke(app, ["submit", "echo", "--batch", "-"],
                        input='{"n": 1}\n{"n": 2}\n')
    assert result.exit_code == 0, result.stderr
    assert [item["input"] for item in api.items] == [{"n": 1}, {"n": 2}]


def test_batch_refuses_an_empty_file_and_a_key_too_long_for_its_lines(
        api: BatchApi, tmp_path: Path) -> None:
    empty = cli.invoke(app, ["submit", "echo", "--batch", str(jsonl(tmp_path, "", " "))])
    assert empty.exit_code == 1 and "no lines; nothing was sent" in empty.stderr
    path = jsonl(tmp_path, *["{}"] * 10)  # the last key is K:10
    fits = cli.invoke(app, ["submit", "echo", "--batch", str(path),
                            "--idempotency-key", "k" * 125])
    assert fits.exit_code == 0, fits.stderr
    long = cli.invoke(app, ["submit", "echo", "--batch", str(path),
                            "--idempotency-key", "k" * 126])
    assert long.exit_code == 1 and "at most 128 characters" in long.stderr
    missing = cli.invoke(app, ["submit", "echo", "--batch", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1 and "No such file" in missing.stderr
    assert len(api.bodies) == 1


def test_an_interrupted_batch_prints_what_was_answered_then_the_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = BatchApi(httpx.Response(202, json={"items": [{"id": "a", "status": "queued"}]}),
                    refusal(503, "unavailable"))
    monkeypatch.setattr(runs_cli, "api_client", lambda: client_for(fake))
    result = cli.invoke(app, ["submit", "echo", "--batch",
                              str(jsonl(tmp_path, "{}", "{}", "{}")), "--chunk-size", "1"])
    assert result.exit_code == 1
    assert output(result.stdout) == [{"line": 1, "id": "a", "status": "queued"}]
    summary, error = result.stderr.strip().splitlines()
    assert summary == "submitted 1 of 3 runs; 2 not answered"
    assert error.startswith("error: the batch stopped after 1 item: unavailable here")


def test_single_submit_takes_labels_and_a_priority(api: BatchApi) -> None:
    result = cli.invoke(app, ["submit", "echo", "--label", "a=1", "--label", "b=2",
                              "--priority", "high"])
    assert result.exit_code == 0, result.stderr
    assert api.bodies == [{"processor": "echo", "input": {}, "labels": {"a": "1", "b": "2"},
                           "priority": "high"}]
    bad = cli.invoke(app, ["submit", "echo", "--priority", "urgent"])
    assert bad.exit_code != 0 and len(api.bodies) == 1
