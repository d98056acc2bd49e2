"""A run's input is strict JSON, and its input_schema is code run on it: bounded.

`check_strict_json` (runner/control/strictjson.py) is the one check of "JSON every
reader agrees on" (no NaN, no infinities, integers within 64 bits); `check_input`
uses it, so the API, `runner processor run` and replay share it. The input_schema's
validator is built once per manifest revision, never retrieves a remote `$ref`, and
its patterns run under a time budget (docs/operators.md, "input_schema").
"""

from __future__ import annotations

import http.server
import json
import math
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import runner.control.runs as runs
from runner.control.runs import Submission, check_input, replay, submit
from runner.control.store import Store
from runner.control.strictjson import check_strict_json, strict_loads
from runner.domain import RunStatus
from runner.errors import InvalidInputError, InvalidRequestError
from runner.manifest import Limits, Manifest, Processor, RetryPolicy, parse_manifest
from tests.unit.conftest import IMAGE, manifest_text, set_run

HUGE = "9" * 5000


class Queue:
    """What `submit` asks of the queue: one `enqueue` per recorded run."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []

    def enqueue(self, run: Any, *, stop_grace_seconds: float) -> None:
        self.enqueued.append(run.id)


def processor(input_schema: dict[str, Any]) -> Processor:
    """A processor built directly, as no manifest would let it be: the checks at run
    time must hold on their own."""
    return Processor(name="p", version="1", image=IMAGE, repo="reg/echo",
                     digest=IMAGE.split("@")[1], limits=Limits(), retry=RetryPolicy(),
                     input_schema=input_schema)


# check_strict_json --------------------------------------------------------------

@pytest.mark.parametrize(("value", "where"), [
    ({"a": math.nan}, "input.a"),
    ({"a": math.inf}, "input.a"),
    ({"a": -math.inf}, "input.a"),
    ({"a": [1, 2, {"b": math.nan}]}, "input.a[2].b"),
    ({"a": 2**63}, "input.a"),
    ({"a": -(2**63) - 1}, "input.a"),
    ({"a": 10**4000}, "input.a"),
    ({"a": {1, 2}}, "input.a"),
    ({1: "x"}, "input"),
])
def test_what_is_not_strict_json_is_refused_naming_the_place(value: Any, where: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_strict_json(value, "input")
    assert caught.value.context["field"] == "input"
    assert caught.value.message.startswith(f"{where}: ")


def test_the_64_bit_range_and_ordinary_values_are_strict_json() -> None:
    check_strict_json({"low": -(2**63), "high": 2**63 - 1, "f": 1.5e300, "t": True,
                       "n": None, "s": "NaN", "l": [[], {}]}, "input")


def test_deep_nesting_is_walked_without_recursion() -> None:
    deep: Any = 1.0
    for _ in range(50_000):
        deep = [deep]
    check_strict_json(deep, "result")
    deep_bad: Any = math.nan
    for _ in range(50_000):
        deep_bad = {"a": deep_bad}
    with pytest.raises(InvalidRequestError):
        check_strict_json(deep_bad, "result")


def test_strict_loads_never_raises_on_numbers_it_must_refuse() -> None:
    # json.loads raises a bare ValueError (past 4,300 digits), a 500 in a web app.
    with pytest.raises(ValueError, match="4300"):
        json.loads('{"n": ' + HUGE + "}")
    loaded = strict_loads('{"n": ' + HUGE + ', "inf": 1e999, "nan": NaN, "ok": 7}')
    assert loaded["ok"] == 7 and math.isinf(loaded["inf"]) and math.isnan(loaded["nan"])
    with pytest.raises(InvalidRequestError) as caught:
        check_strict_json(loaded, "input")
    assert caught.value.message.startswith("input.n: an integer of 5000 digits")
    with pytest.raises(json.JSONDecodeError):
        strict_loads(b"{not json")


# check_input, submit and replay -----------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2**64, -(2**70)])
def test_check_input_refuses_non_finite_and_huge_numbers(value: float) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_input(processor({"type": "object"}), {"n": value}, max_bytes=1024)
    assert caught.value.context["field"] == "input"
    assert caught.value.message.startswith("input.n: ")


def test_submit_stores_nothing_for_a_nan_input(store: Store, manifest: Manifest) -> None:
    queue = Queue()
    with pytest.raises(InvalidRequestError) as caught:
        submit(Submission(tenant="t", processor="echo", version=None,
                          input={"x": math.nan}),
               manifest=manifest, store=store, queue=queue, default_queue="q",  # type: ignore[arg-type]
               stop_grace_seconds=1)
    assert caught.value.context["field"] == "input"
    assert store.list_runs(tenant="t")[0] == [] and queue.enqueued == []


def test_replay_of_a_stored_nan_input_is_refused(store: Store, manifest: Manifest,
                                                 new_run: Any) -> None:
    # SQLite keeps `NaN` text where PostgreSQL would not: a run stored before the check.
    original = new_run(tenant="t", input={"x": math.nan})
    set_run(store, original.id, status=RunStatus.FAILED.value)
    queue = Queue()
    with pytest.raises(InvalidRequestError) as caught:
        replay(original.id, tenant="t", manifest=manifest, store=store,
               queue=queue, default_queue="q", stop_grace_seconds=1)  # type: ignore[arg-type]
    assert caught.value.context["field"] == "input"
    assert [r.id for r in store.list_runs(tenant="t")[0]] == [original.id]


# input_schema: no remote $ref --------------------------------------------------------

@pytest.fixture
def schema_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that serves a schema and records every request it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/schema+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", hits
    server.shutdown()
    server.server_close()


def test_a_remote_ref_is_never_fetched_at_submission(
        schema_server: tuple[str, list[str]]) -> None:
    url, hits = schema_server
    remote = processor({"type": "object", "properties": {"a": {"$ref": f"{url}/s.json"}}})
    with pytest.raises(InvalidInputError) as caught:
        check_input(remote, {"a": 1}, max_bytes=1024)
    assert "$ref" in caught.value.message and "does not resolve" in caught.value.message
    assert hits == []


def test_a_local_ref_resolves() -> None:
    local = processor({"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}},
                       "$defs": {"n": {"type": "integer"}}})
    check_input(local, {"a": 1}, max_bytes=1024)
    with pytest.raises(InvalidInputError) as caught:
        check_input(local, {"a": "x"}, max_bytes=1024)
    assert caught.value.context["field"] == "input.a"


# input_schema: compiled once per manifest revision -------------------------------------

def test_the_validator_is_built_once_per_revision(store: Store,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A revision of its own, so no other test can have built its validator already.
    manifest = parse_manifest(manifest_text() + f"    description: {secrets.token_hex(8)}\n")
    built: list[object] = []
    real = runs.input_schema_validator

    def counting(schema: Any) -> Any:
        built.append(schema)
        return real(schema)

    monkeypatch.setattr(runs, "input_schema_validator", counting)
    queue = Queue()
    for number in range(5):
        submit(Submission(tenant="t", processor="echo", version=None, input={"n": number}),
               manifest=manifest, store=store, queue=queue, default_queue="q",  # type: ignore[arg-type]
               stop_grace_seconds=1)
    assert len(built) == 1
    edited = parse_manifest(manifest_text() + f"    description: {secrets.token_hex(8)}\n")
    assert edited.revision != manifest.revision
    submit(Submission(tenant="t", processor="echo", version=None, input={}),
           manifest=edited, store=store, queue=queue, default_queue="q",  # type: ignore[arg-type]
           stop_grace_seconds=1)
    assert len(built) == 2


# input_schema: patterns are bounded -----------------------------------------------------

EVIL = "(a+)+$"
# Python's re needs ~2.6 s for 25 a's and a "!" on this pattern, 84 s for 30 (doubling
# with each character more). The regex engine answers 30 in 0.2 ms, but it too
# backtracks past any bound on longer strings or other patterns: the budget ends those.
SLOW = "a" * 25 + "!"
LONG = "a" * 5000 + "!"


@pytest.mark.parametrize(("schema", "value"), [
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL}}},
     {"s": SLOW}),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL}}},
     {"s": LONG}),
    ({"type": "object", "patternProperties": {EVIL: {"type": "string"}}}, {LONG: 1}),
    ({"type": "object", "patternProperties": {EVIL: {}}, "additionalProperties": False},
     {SLOW: 1, LONG: 2}),
    ({"type": "object", "properties": {"l": {"items": {"pattern": "(a|aa)+$"}}}},
     {"l": ["a" * 60 + "!"] * 50}),
    ({"type": "object", "propertyNames": {"pattern": EVIL}}, {SLOW: 1, LONG: 2}),
])
def test_a_catastrophic_pattern_takes_a_bounded_time(schema: dict[str, Any],
                                                     value: dict[str, Any]) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidInputError) as caught:
        check_input(processor(schema), value, max_bytes=1024 * 1024)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.5, f"{elapsed:.2f}s"
    assert "budget" in caught.value.message or "match" in caught.value.message


@pytest.mark.parametrize(("pattern", "text"), [
    (EVIL, LONG), ("(a|aa)+$", "a" * 30 + "!"), ("^(a|a)*$", "a" * 60 + "!"),
])
def test_the_budget_refuses_an_input_its_patterns_cannot_decide(pattern: str,
                                                                text: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidInputError) as caught:
        check_input(processor({"properties": {"s": {"pattern": pattern}}}), {"s": text},
                    max_bytes=1024 * 1024)
    assert time.perf_counter() - started < 1.5
    assert caught.value.context["field"] == "input"
    assert caught.value.message == (f"input: the input_schema pattern {pattern!r} took over "
                                    "the 0.25 s budget of one input's patterns; the input "
                                    "is refused")


def test_ordinary_patterns_still_match_and_fail() -> None:
    named = processor({"type": "object",
                       "properties": {"s": {"type": "string", "pattern": "^[a-z]+$"}},
                       "patternProperties": {"^x-": {"type": "integer"}},
                       "additionalProperties": False})
    check_input(named, {"s": "abc", "x-one": 1}, max_bytes=1024)
    with pytest.raises(InvalidInputError) as caught:
        check_input(named, {"s": "ABC"}, max_bytes=1024)
    assert caught.value.context["field"] == "input.s"
    assert "does not match" in caught.value.message
    with pytest.raises(InvalidInputError) as caught:
        check_input(named, {"x-one": "no"}, max_bytes=1024)
    assert caught.value.context["field"] == "input.x-one"
    with pytest.raises(InvalidInputError) as caught:
        check_input(named, {"other": 1}, max_bytes=1024)
    assert "other" in caught.value.message


def test_many_strings_under_an_ordinary_pattern_fit_the_budget() -> None:
    listed = processor({"type": "object", "properties": {"l": {
        "type": "array", "items": {"type": "string", "pattern": "^[a-z0-9-]{1,40}$"}}}})
    check_input(listed, {"l": [f"item-{n}" for n in range(20_000)]}, max_bytes=1024**2)
