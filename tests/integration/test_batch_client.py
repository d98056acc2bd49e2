"""Batches through the real API: `RunnerClient.submit_many` and `runner submit --batch`
against POST /v1/runs/batch on real PostgreSQL and Redis.

Each test has a tenant of its own and an API whose queue no worker serves, so its
runs stay queued and never execute; what was made is read back from the database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.client import ApiError, BatchInterruptedError, RunnerClient
from runner.control.keys import Keys
from runner.control.store import Store
from runner.domain import Role
from tests.integration.conftest import SESSION

RUNNER = os.path.join(os.path.dirname(sys.executable), "runner")
PARKED = {"queue": f"parked-{SESSION}", "key_requests_per_second": 0}


def tenant_key(store: Store, name: str) -> tuple[str, str]:
    tenant = f"{name}-{SESSION}"
    return tenant, Keys(store).create(tenant=tenant, role=Role.SUBMITTER)[1]


def stored_inputs(store: Store, tenant: str) -> dict[str, Any]:
    """{run id: input} of every run the tenant has."""
    runs, _ = store.list_runs(tenant=tenant, limit=5000)
    return {run.id: run.input for run in runs}


def early_in_a_minute() -> float:
    """Sleep past a minute's last 15 s (the rate limits count in clock minutes), so the
    next few requests fall in one window; the window's number."""
    if time.time() % 60 > 45:
        time.sleep(60.5 - time.time() % 60)
    return time.time() // 60


def test_submit_many_of_1200_items_answers_1200_runs_in_order(
        api_with: Callable[..., str], store: Store) -> None:
    url = api_with(**PARKED, tenant_submissions_per_minute=0, tenant_max_active_runs=0)
    tenant, key = tenant_key(store, "batch-many")
    seen: list[tuple[int, int | None]] = []
    items = ({"processor": "echo", "input": {"message": str(n)}} for n in range(1200))
    with RunnerClient(url, key, timeout=120) as client:
        results = client.submit_many(items, chunk_size=500, total=1200,
                                     on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(500, 1200), (1000, 1200), (1200, 1200)]
    assert len(results) == 1200 and all(r["status"] == "queued" for r in results)
    assert len({r["id"] for r in results}) == 1200
    inputs = stored_inputs(store, tenant)
    assert [inputs[r["id"]] for r in results] == [{"message": str(n)} for n in range(1200)]


def test_chunks_over_the_services_own_cap_go_up_in_halves(
        api_with: Callable[..., str], store: Store) -> None:
    url = api_with(**PARKED, tenant_submissions_per_minute=0, batch_max_items=100)
    tenant, key = tenant_key(store, "batch-cap")
    items = [{"processor": "echo", "input": {"message": str(n)}} for n in range(250)]
    with RunnerClient(url, key) as client:
        results = client.submit_many(items, chunk_size=500)
    inputs = stored_inputs(store, tenant)
    assert [inputs[r["id"]] for r in results] == [item["input"] for item in items]


def test_a_mix_of_good_and_bad_items_keeps_the_order_and_the_errors(
        api_with: Callable[..., str], store: Store) -> None:
    url = api_with(**PARKED, tenant_submissions_per_minute=0)
    tenant, key = tenant_key(store, "batch-mix")
    items: list[dict[str, Any]] = [
        {"processor": "echo", "input": {"message": "first"}},
        {"processor": "nope", "input": {}},
        {"processor": "echo", "input": {"message": 12}},
        {"processor": "echo", "input": {}, "privileged": True},
        {"processor": "echo", "input": {"message": "high"}, "priority": "high"},
        {"processor": "echo", "input": {}, "priority": "urgent"},
        {"processor": "echo", "input": {"message": "last"}, "labels": {"team": "ml"}},
    ]
    with RunnerClient(url, key) as client:
        results = client.submit_many(items, chunk_size=3)
    assert [("id" in r) for r in results] == [True, False, False, False, True, False, True]
    codes = [(r["error"]["code"], r["error"]["field"]) for r in results if "error" in r]
    assert codes[0] == ("unknown_processor", "processor")
    assert codes[1] == ("invalid_input", "input.message")
    assert codes[2][0] == "invalid_request" and "privileged" in str(codes[2][1])
    assert codes[3][0] == "invalid_request" and "priority" in str(codes[3][1])
    assert all(r["error"]["message"] for r in results if "error" in r)
    inputs = stored_inputs(store, tenant)
    assert sorted(map(str, inputs.values())) == sorted(
        str({"message": m}) for m in ("first", "high", "last"))
    made = {r["id"]: r for r in results if "id" in r}
    assert store.get_run(results[4]["id"]).priority == "high"  # type: ignore[union-attr]
    assert made[results[6]["id"]]["labels"] == {"team": "ml"}


def test_items_over_the_rate_limit_are_refused_and_a_full_limit_is_a_429(
        api_with: Callable[..., str], store: Store) -> None:
    url = api_with(**PARKED, tenant_submissions_per_minute=5)
    tenant, key = tenant_key(store, "batch-rate")
    items = [{"processor": "echo", "input": {}, "idempotency_key": f"r:{n}"}
             for n in range(8)]
    refusal: BatchInterruptedError | None = None
    with RunnerClient(url, key) as client:
        window = early_in_a_minute()
        results = client.submit_many(items)
        try:
            client.submit_many(items[5:], patience=0)
        except BatchInterruptedError as exc:
            refusal = exc
    assert time.time() // 60 == window, "the requests took 15 s: too slow to tell"
    assert [("id" in r) for r in results] == [True] * 5 + [False] * 3
    assert {r["error"]["code"] for r in results[5:]} == {"rate_limited"}
    assert len(stored_inputs(store, tenant)) == 5
    # No room left for any item: the whole request is 429, nothing accepted.
    assert refusal is not None and refusal.results == []
    cause = refusal.cause
    assert isinstance(cause, ApiError) and cause.status == 429
    assert cause.retry_after is not None and 1 <= cause.retry_after <= 60


def test_the_cli_batch_with_a_key_sent_twice_returns_the_same_runs(
        api_with: Callable[..., str], store: Store, tmp_path: Path) -> None:
    url = api_with(**PARKED, tenant_submissions_per_minute=0)
    tenant, key = tenant_key(store, "batch-cli")
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps({"message": f"m{n}"}) + "\n" + ("\n" if n == 3 else "")
                            for n in range(25)))
    args = ["submit", "echo", "--batch", str(path), "--idempotency-key", f"cli-{SESSION}",
            "--chunk-size", "10", "--label", "source=cli"]
    # The real command, in a process of its own (the API's logs go to this one's stdout).
    env = {**os.environ, "RUNNER_API_URL": url, "RUNNER_API_KEY": key}
    first, again = (subprocess.run([RUNNER, *args], env=env, capture_output=True, text=True,
                                   timeout=120) for _ in range(2))
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [line["line"] for line in lines] == [*range(1, 5), *range(6, 27)]  # 5 is blank
    assert first.stdout == again.stdout
    assert first.stderr.strip() == again.stderr.strip() == "submitted 25 of 25 runs"
    inputs = stored_inputs(store, tenant)
    assert len(inputs) == 25
    assert [inputs[line["id"]] for line in lines] == [{"message": f"m{n}"} for n in range(25)]
    assert store.get_run(lines[0]["id"]).labels == {"source": "cli"}  # type: ignore[union-attr]
