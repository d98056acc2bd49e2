"""The API's bounds under hostile use, against the real stack (PostgreSQL, Redis, a
worker): strict JSON results, follow stream caps, incremental log reads, a full
connection pool, NUL characters, failed-authentication limits and list page size."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import delete, func, insert, literal, select, update

from runner.client import RunnerClient
from runner.control.keys import Keys
from runner.control.lifecycle import Lifecycle
from runner.control.logstore import log_chunks_since
from runner.control.models import RunRow
from runner.control.store import Store, new_run_id
from runner.domain import NewRun, Role, RunStatus
from runner.settings import Settings
from tests.integration.conftest import SESSION
from tests.support.processes import child_env, start_api_process
from tests.support.waiting import wait_until

PARKED = f"parked-{SESSION}"  # a queue no worker reads: its runs stay queued
IMAGE = "127.0.0.1:5000/processors/none@sha256:" + "0" * 64


def strict_json(text: str) -> Any:
    """`text` as JSON, refusing NaN and Infinity (which Python's json accepts)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in the body")

    return json.loads(text, parse_constant=refuse)


def seed_run(store: Store, tenant: str, input: Any = None, *, result: Any = None,
             status: RunStatus = RunStatus.QUEUED) -> str:
    """A run recorded straight in the database, in no Redis queue (its processor is in
    no manifest, so no worker or reconciler picks it up)."""
    run, _ = store.create_run(NewRun(
        tenant=tenant, processor="not-in-manifest", version="1.0.0", image=IMAGE,
        queue=PARKED, input=input if input is not None else {}, timeout_seconds=30,
        max_attempts=1, manifest_revision="sha256:none"))
    if result is not None or status is not RunStatus.QUEUED:
        with store.session() as session:
            session.execute(update(RunRow).where(RunRow.id == run.id)
                            .values(result=result, status=status.value, attempt=1))
    return run.id


def bearer(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


# Item 5: a processor's result must be strict JSON -----------------------------------

@pytest.mark.parametrize(("mode", "why"), [
    ("nan", "NaN is not a JSON value"),
    ("infinity", "-Infinity is not a JSON value"),
    ("bigfloat", "1e999 is out of range"),
    ("bigint", "5000 digits is too long"),
])
def test_a_result_that_is_not_strict_json_fails_the_run(
        run_and_wait: Callable[..., dict[str, Any]], api_url: str, keys: dict[str, str],
        mode: str, why: str) -> None:
    """Before: NaN succeeded on SQLite (and the run object stopped being JSON) and
    crashed the attempt on PostgreSQL, leaving the run `running` until its lease lapsed."""
    run = run_and_wait("nanresult", {"mode": mode}, timeout_seconds=30)
    assert (run["status"], run["error_code"], run["error_stage"]) == (
        "failed", "invalid_output", "collect"), run
    assert why in run["error_message"] and run["result"] is None
    raw = httpx.get(f"{api_url}/v1/runs/{run['id']}", headers=bearer(keys["viewer"]),
                    timeout=30)
    assert raw.status_code == 200
    assert strict_json(raw.text)["error_code"] == "invalid_output"


def test_a_strict_json_result_still_succeeds(
        run_and_wait: Callable[..., dict[str, Any]]) -> None:
    run = run_and_wait("nanresult", {"mode": "ok"}, timeout_seconds=30)
    assert (run["status"], run["result"]) == ("succeeded", {"x": 1.5}), run


# Item 10: follow streams ----------------------------------------------------------

@pytest.fixture
def follow_tenant(store: Store) -> Iterator[str]:
    """A tenant of its own; its runs still queued are canceled after the test."""
    tenant = f"follow-{secrets.token_hex(3)}"
    yield tenant
    lifecycle = Lifecycle(store)
    for run in store.list_runs(tenant=tenant, status="queued", limit=200)[0]:
        with contextlib.suppress(Exception):
            lifecycle.cancel(run.id, tenant=tenant)


def open_follow(stack: contextlib.ExitStack, http: httpx.Client, url: str, run_id: str,
                key: str) -> httpx.Response:
    """A follow stream, open once its headers arrive (the body is not read)."""
    return stack.enter_context(http.stream(
        "GET", f"{url}/v1/runs/{run_id}/logs", params={"follow": "true"},
        headers=bearer(key), timeout=httpx.Timeout(20)))


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.status_code
    response.read()
    assert response.json()["error"]["code"] == code
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_follows_are_capped_per_key_and_per_process(
        api_with: Callable[..., str], store: Store, follow_tenant: str) -> None:
    url = api_with(follow_max_per_key=2, follow_max_per_process=3, follow_max_seconds=60)
    run_id = seed_run(store, follow_tenant)
    a, b, c = (Keys(store).create(tenant=follow_tenant, role=Role.VIEWER)[1]
               for _ in range(3))
    with httpx.Client() as http, contextlib.ExitStack() as stack:
        first = open_follow(stack, http, url, run_id, a)
        assert first.status_code == 200
        assert open_follow(stack, http, url, run_id, a).status_code == 200
        refused(open_follow(stack, http, url, run_id, a), 429, "rate_limited")
        assert open_follow(stack, http, url, run_id, b).status_code == 200
        refused(open_follow(stack, http, url, run_id, c), 503, "unavailable")
        first.close()  # the server sees it gone and gives the slot back

        def reopened() -> bool:
            with contextlib.ExitStack() as attempt:
                response = open_follow(attempt, http, url, run_id, a)
                if response.status_code != 200:
                    return False
                stack.enter_context(contextlib.closing(response))
                attempt.pop_all()
                return True

        wait_until(reopened, timeout=15, interval=0.2,
                   message="a closed follow's slot was never given back")


def test_a_revoked_key_stops_its_follow(api_with: Callable[..., str], store: Store,
                                        follow_tenant: str) -> None:
    url = api_with(follow_key_check_seconds=1, follow_max_seconds=60)
    run_id = seed_run(store, follow_tenant)
    info, key = Keys(store).create(tenant=follow_tenant, role=Role.VIEWER)
    with httpx.Client() as http, contextlib.ExitStack() as stack:
        stream = open_follow(stack, http, url, run_id, key)
        assert stream.status_code == 200
        assert Keys(store).revoke(info.id)
        revoked_at = time.monotonic()
        # Before: the stream went on until follow_max_seconds (60 s here), so the
        # 20 s read timeout below failed the test.
        assert b"".join(stream.iter_bytes()) == b""
        assert time.monotonic() - revoked_at < 15


def test_a_follow_reads_only_the_chunks_past_its_offset(store: Store) -> None:
    """Before: every poll of a follow read the run's whole log (then sliced it)."""
    run_id = seed_run(store, f"logs-{SESSION}", status=RunStatus.RUNNING)
    sizes = [1 + (i * 7) % 13 for i in range(40)]
    position = 0
    for i, size in enumerate(sizes):
        store.append_log(run_id, 1, offset=position, data=bytes([65 + i % 26]) * size)
        position += size
    whole = store.read_logs(run_id)
    assert len(whole) == position == sum(sizes)
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]

    def chunks_read(offset: int) -> int:
        with store.session() as session:
            count = session.scalar(select(func.count()).select_from(
                log_chunks_since(run_id, offset).subquery()))
        return int(count or 0)

    for offset in range(0, position + 3):
        assert chunks_read(offset) == sum(1 for end in ends if end > offset), offset
        for limit in (1, 5, 64, 10_000):
            assert store.read_logs_since(run_id, offset, limit) == whole[offset:offset + limit]


def test_a_full_connection_pool_is_503_with_retry_after(
        api_with: Callable[..., str], settings: Settings, keys: dict[str, str]) -> None:
    """Before: SQLAlchemy's pool timeout was an unmapped error, a 500."""
    url = api_with(api_database_pool_size=1, api_database_max_overflow=0,
                   api_database_pool_timeout_seconds=1)
    dsn = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    headers = bearer(keys["viewer"])
    with psycopg.connect(dsn) as locker, psycopg.connect(dsn, autocommit=True) as watcher, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The pool's one connection waits on this lock, inside the key lookup.
        locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        held = pool.submit(httpx.get, f"{url}/v1/processors", headers=headers, timeout=30)

        def waiting() -> bool:
            row = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query ILIKE '%api_keys%'").fetchone()
            return bool(row and row[0])

        wait_until(waiting, timeout=15, message="the first request never waited on the lock")
        started = time.monotonic()
        busy = httpx.get(f"{url}/v1/runs", headers=headers, timeout=30)
        took = time.monotonic() - started
        locker.rollback()
        assert held.result().status_code == 200
    assert busy.status_code == 503, busy.text
    assert busy.json()["error"]["code"] == "unavailable"
    assert "no connection free" in busy.json()["error"]["message"]
    assert busy.headers["Retry-After"] == "2"
    assert took < 8


# Item 13: NUL characters, failed authentications ----------------------------------

@pytest.mark.parametrize("path", [
    "/v1/runs/%00", "/v1/runs/0190a1b2-c3d4-e5f6-0718-293a4b5c6d%00e",
    "/v1/runs/" + "%00" * 36, "/v1/runs/%00/logs", "/v1/runs/%00/logs?follow=true",
])
def test_a_nul_in_a_run_id_is_404(api_url: str, keys: dict[str, str], path: str) -> None:
    """Before: PostgreSQL refused the text and the API answered 500."""
    response = httpx.get(api_url + path, headers=bearer(keys["viewer"]), timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"
    cancel = httpx.post(api_url + path.split("/logs")[0] + "/cancel",
                        headers=bearer(keys["submitter"]), timeout=30)
    assert cancel.status_code == 404, cancel.text


@pytest.mark.parametrize(("params", "field"), [
    ({"cursor": base64.urlsafe_b64encode(b"\x00" * 36).decode().rstrip("=")}, "cursor"),
    ({"cursor": base64.urlsafe_b64encode(
        b"0190a1b2-c3d4-e5f6-0718-293a4b5c6d\x00e").decode().rstrip("=")}, "cursor"),
    ({"processor": "echo\x00"}, "processor"),
    ({"label": "team=\x00"}, "label"),
])
def test_a_nul_in_a_list_filter_is_422(api_url: str, keys: dict[str, str],
                                       params: dict[str, str], field: str) -> None:
    response = httpx.get(f"{api_url}/v1/runs", params=params,
                         headers=bearer(keys["viewer"]), timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_failed_authentications_from_one_address_are_limited(
        api_with: Callable[..., str], keys: dict[str, str]) -> None:
    """Before: every unknown key cost a database lookup and answered 401, for ever."""
    limit = 5
    url = api_with(auth_failures_per_minute=limit, key_requests_per_second=0)
    # uvicorn takes the client's address from X-Forwarded-For on loopback connections
    # (a proxy in front), so each address here is this test's own.
    guesser, bystander, sloppy = (f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"
                                  for _ in range(3))

    def get(key: str, address: str) -> httpx.Response:
        return httpx.get(f"{url}/v1/processors", timeout=30,
                         headers=bearer(key, **{"X-Forwarded-For": address}))

    valid = keys["viewer"]
    failures = 0
    # The failures are counted in one-minute windows: if they straddle the end of one,
    # up to 2 * limit - 1 get through before the address is blocked.
    while get(valid, guesser).status_code == 200:
        assert failures < 2 * limit - 1, "never blocked"
        guess = get(f"rk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}", guesser)
        assert guess.status_code == 401
        failures += 1
    assert failures >= limit
    blocked = get(valid, guesser)  # a valid key too, for the rest of the minute
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "rate_limited"
    assert "failed authentications" in blocked.json()["error"]["message"]
    assert 50 <= int(blocked.headers["Retry-After"]) <= 60
    assert get(f"rk_{secrets.token_hex(6)}_x", guesser).status_code == 429  # no lookup
    assert get(valid, bystander).status_code == 200
    # Tokens that are not even shaped like a key cost no lookup, and are not counted.
    for _ in range(2 * limit):
        assert get("not-a-key", sloppy).status_code == 401
    assert get(valid, sloppy).status_code == 200


# Item 11: list pages are bounded in bytes --------------------------------------------

def test_list_items_carry_input_and_result_only_when_asked(
        store: Store, api_url: str) -> None:
    tenant = f"list-{secrets.token_hex(3)}"
    _, key = Keys(store).create(tenant=tenant, role=Role.VIEWER)
    small = seed_run(store, tenant, {"n": 1}, result={"ok": True},
                     status=RunStatus.SUCCEEDED)
    big = seed_run(store, tenant, {"blob": "x" * 70_000}, result=[1, 2],
                   status=RunStatus.SUCCEEDED)
    none = seed_run(store, tenant, {"n": 2})

    with RunnerClient(api_url, key) as client:
        def items(**params: Any) -> dict[str, dict[str, Any]]:
            return {r["id"]: r for r in client.runs(**params)["items"]}

        default = items()
        assert set(default) == {small, big, none}
        for item in default.values():
            assert (item["input"], item["result"]) == (None, None)
            assert item["omitted"] == ["input", "result"]
        asked = items(include=["input", "result"])
        assert (asked[small]["input"], asked[small]["result"]) == ({"n": 1}, {"ok": True})
        assert asked[small]["omitted"] == []
        assert (asked[big]["input"], asked[big]["result"]) == (None, [1, 2])
        assert asked[big]["omitted"] == ["input"]  # over 64 KiB as stored
        assert (asked[none]["input"], asked[none]["result"], asked[none]["omitted"]) == (
            {"n": 2}, None, [])
        only = items(include="result")
        assert (only[small]["input"], only[small]["result"]) == (None, {"ok": True})
        assert only[small]["omitted"] == ["input"]
        assert client.run(big)["input"] == {"blob": "x" * 70_000}  # whole, one by one
    for bad in ("inputs", "input,", "labels", "input,result,input"):
        response = httpx.get(f"{api_url}/v1/runs", params={"include": bad},
                             headers=bearer(key), timeout=30)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["field"] == "include"


HOSTILE_RUNS = 200
HOSTILE_INPUT = {"a": [{}] * (256 * 1024)}  # 1 MiB of JSON, ~18 MiB once parsed
RSS_GROWTH_BOUND_MIB = 64


@pytest.fixture
def hostile_tenant(store: Store) -> Iterator[str]:
    """200 runs of 1 MiB inputs of empty objects (copied in the database from one)."""
    tenant = f"hostile-{secrets.token_hex(3)}"
    first = seed_run(store, tenant, HOSTILE_INPUT)
    columns = [c for c in RunRow.__table__.columns if c.name != "id"]
    with store.session() as session:
        for _ in range(HOSTILE_RUNS - 1):
            session.execute(insert(RunRow).from_select(
                ["id", *(c.name for c in columns)],
                select(literal(new_run_id()), *columns).where(RunRow.id == first)))
    yield tenant
    with store.session() as session:
        session.execute(delete(RunRow).where(RunRow.tenant == tenant))


def test_api_memory_stays_bounded_under_a_hostile_list_load(
        settings: Settings, store: Store, hostile_tenant: str, tmp_path: Path) -> None:
    """Before: one page (limit=200) parsed and re-encoded 200 MiB of input: the API
    process grew by gigabytes. Now input and result are left out unless asked for,
    and when asked for, a value over 64 KiB is measured and left out in PostgreSQL."""
    _, key = Keys(store).create(tenant=hostile_tenant, role=Role.VIEWER)
    api = start_api_process(child_env(settings, RUNNER_KEY_REQUESTS_PER_SECOND="0"),
                            tmp_path / "api.log")
    try:
        with httpx.Client(base_url=str(api.url), headers=bearer(key), timeout=60) as http:
            def page(**params: Any) -> httpx.Response:
                response = http.get("/v1/runs", params={"limit": 200, **params})
                assert response.status_code == 200, response.text[:500]
                return response

            page(limit=1)  # warm: imports, pool, first queries
            before_kib = api.rss_kib()
            sizes = []
            lock = threading.Lock()

            def load(params: dict[str, Any]) -> None:
                body = page(**params)
                items = body.json()["items"]
                assert len(items) == HOSTILE_RUNS
                assert all(i["input"] is None and "input" in i["omitted"] for i in items)
                with lock:
                    sizes.append(len(body.content))

            asks: list[dict[str, Any]] = [{}, {"include": "input,result"}] * 5
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                list(pool.map(load, asks))
            peak_kib = api.memory_kib("VmHWM")
        growth_mib = (peak_kib - before_kib) / 1024
        print(f"API RSS before {before_kib / 1024:.0f} MiB, peak {peak_kib / 1024:.0f} MiB "
              f"(+{growth_mib:.1f} MiB) over {len(asks)} pages of {HOSTILE_RUNS} runs "
              f"with 1 MiB inputs; largest page {max(sizes) / 1024:.0f} KiB")
        assert max(sizes) < 512 * 1024
        assert growth_mib < RSS_GROWTH_BOUND_MIB, growth_mib
    finally:
        api.stop()
