"""POST /v1/runs/batch against a real API, PostgreSQL (or SQLite) and Redis: items
checked one by one, answered in order, recorded together, counted as items."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from runner.control.lanes import lane_key
from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.domain import Priority
from runner.settings import Settings


def batch(api_url: str, key: str, runs: Any, **headers: str) -> httpx.Response:
    headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{api_url}/v1/runs/batch", json={"runs": runs}, headers=headers,
                      timeout=60)


def echo(message: str, **extra: Any) -> dict[str, Any]:
    return {"processor": "echo", "input": {"message": message}, **extra}


def test_items_are_answered_in_order_each_with_its_run_or_its_error(
        api_url: str, keys: dict[str, str], store: Store) -> None:
    tag = uuid.uuid4().hex[:8]
    runs = [echo(f"{tag}-0"),
            {"processor": "nope", "input": {}},
            echo(f"{tag}-2", priority="high", labels={"batch": tag}),
            {"processor": "echo", "input": {"message": 12}},
            {"processor": "echo", "input": {}, "privileged": True},
            echo(f"{tag}-5", timeout_seconds=3000),
            "not an object",
            echo(f"{tag}-7", priority="urgent")]
    response = batch(api_url, keys["submitter"], runs)
    assert response.status_code == 202, response.text
    items = response.json()["items"]
    assert len(items) == len(runs)
    assert items[0]["status"] == "queued" and items[0]["input"] == {"message": f"{tag}-0"}
    assert items[1]["error"]["code"] == "unknown_processor"
    assert items[1]["error"]["field"] == "processor"
    assert items[2]["priority"] == "high" and items[2]["labels"] == {"batch": tag}
    assert items[3]["error"] == {"code": "invalid_input", "field": "input.message",
                                 "message": items[3]["error"]["message"]}
    assert items[4]["error"]["code"] == "invalid_request"
    assert items[4]["error"]["field"] == "privileged"
    assert "unknown field" in items[4]["error"]["message"]
    assert items[5]["error"]["field"] == "timeout_seconds"
    assert items[6]["error"]["code"] == "invalid_request"
    assert items[7]["error"]["field"] == "priority"
    # The accepted ones are recorded, with what they asked for, and nothing else is.
    accepted = [items[0]["id"], items[2]["id"]]
    for run_id in accepted:
        run = store.get_run(run_id, tenant="acme")
        assert run is not None and run.status.value == "queued"
    assert store.get_run(items[2]["id"]).priority is Priority.HIGH  # type: ignore[union-attr]
    listed, _ = store.list_runs(tenant="acme", limit=200)
    assert sum(1 for r in listed if str(r.input.get("message", "")).startswith(tag)) == 2


def test_a_batch_is_one_transaction_and_one_pipeline(
        api_url: str, keys: dict[str, str], settings: Settings) -> None:
    """All records in one commit (PostgreSQL: one transaction id on every row), all
    jobs in their lane."""
    tag = uuid.uuid4().hex[:8]
    response = batch(api_url, keys["submitter"],
                     [echo(f"{tag}-{i}", priority="low") for i in range(300)])
    assert response.status_code == 202, response.text
    ids = [item["id"] for item in response.json()["items"]]
    assert len(set(ids)) == 300
    queue = RunQueue.from_url(settings.redis_url)
    waiting = {b.decode() for b in queue.redis.lrange(
        lane_key(settings.queue, "acme", Priority.LOW), 0, -1)}
    assert {f"run-{i}-1" for i in ids} <= waiting
    with Store(settings.database_url).session() as session:
        writers = session.execute(text("SELECT count(DISTINCT xmin::text) FROM runs "
                                       "WHERE id = ANY(:ids)"), {"ids": ids}).scalar()
    assert writers == 1


def test_a_batch_sent_again_with_its_keys_returns_the_same_runs(
        api_url: str, keys: dict[str, str]) -> None:
    tag = uuid.uuid4().hex[:8]
    runs = [echo(f"{tag}-{i}", idempotency_key=f"{tag}-{i}") for i in range(20)]
    first = batch(api_url, keys["submitter"], runs).json()["items"]
    again = batch(api_url, keys["submitter"], runs).json()["items"]
    assert [r["id"] for r in again] == [r["id"] for r in first]
    # A key used again within one batch is the same run; with another body, refused.
    twice = batch(api_url, keys["submitter"], [
        echo(f"{tag}-x", idempotency_key=f"{tag}-x"),
        echo(f"{tag}-x", idempotency_key=f"{tag}-x"),
        echo(f"{tag}-other", idempotency_key=f"{tag}-x"),
        echo(f"{tag}-0b", idempotency_key=f"{tag}-0")]).json()["items"]
    assert twice[0]["id"] == twice[1]["id"]
    assert twice[2]["error"]["field"] == "idempotency_key"
    assert twice[3]["error"]["field"] == "idempotency_key"
    # The single POST's Idempotency-Key and an item's key are one namespace.
    single = httpx.post(f"{api_url}/v1/runs", json=echo(f"{tag}-0"), timeout=30, headers={
        "Authorization": f"Bearer {keys['submitter']}", "Idempotency-Key": f"{tag}-0"})
    assert single.json()["id"] == first[0]["id"]


def test_not_a_batch_is_422_naming_runs(api_url: str, keys: dict[str, str]) -> None:
    for body in ({"runs": []}, {"runs": [echo("x")] * 1001}, {"runs": "x"}, {}):
        response = httpx.post(f"{api_url}/v1/runs/batch", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {keys['submitter']}"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"].startswith("runs"), response.text
    response = httpx.post(f"{api_url}/v1/runs/batch", json={"runs": [echo("x")]},
                          timeout=30, headers={"Authorization": f"Bearer {keys['viewer']}"})
    assert response.status_code == 403


def test_the_service_cap_on_items_is_422(api_with: Callable[..., str],
                                        keys: dict[str, str]) -> None:
    url = api_with(batch_max_items=5)
    response = batch(url, keys["submitter"], [echo("x")] * 6)
    assert response.status_code == 422 and response.json()["error"]["field"] == "runs"
    assert batch(url, keys["submitter"], [echo("x")] * 5).status_code == 202


@pytest.mark.parametrize("kind", ["rate", "quota"])
def test_limits_count_items_and_refuse_only_the_excess(
        api_with: Callable[..., str], store: Store, kind: str) -> None:
    from runner.control.keys import Keys
    from runner.domain import Role

    tenant = f"limits-{uuid.uuid4().hex[:8]}"
    key = Keys(store).create(tenant=tenant, role=Role.SUBMITTER)[1]
    url = api_with(tenant_submissions_per_minute=7) if kind == "rate" else api_with(
        tenant_max_active_runs=7)
    items = batch(url, key, [echo(str(i)) for i in range(10)]).json()["items"]
    code = "rate_limited" if kind == "rate" else "quota_exceeded"
    assert ["id" in i for i in items] == [True] * 7 + [False] * 3
    assert {i["error"]["code"] for i in items[7:]} == {code}
    if kind == "rate":  # nothing left at all: the whole batch waits
        response = batch(url, key, [echo("more")])
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    else:  # a quota refusal is per item; the refused ones cost nothing
        assert len(store.list_runs(tenant=tenant, limit=50)[0]) == 7
