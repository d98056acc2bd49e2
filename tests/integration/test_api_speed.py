"""The fast path of an authenticated request: the address's block, the key's rate and
the tenant's submissions in one Redis round trip (`RateLimiter.admit`), with exactly
the answers the separate calls gave; and `POST /v1/runs` answering what its
`response_model` describes. Against a throwaway Redis of its own, so the commands
counted are this test's only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.schemas import RunOut
from runner.control.ratelimit import Limit, RateLimiter
from runner.errors import RateLimitedError
from tests.support.services import RedisServer


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    server = RedisServer(tmp_path)
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()
    server.stop()


class CountingConnection(redis.Connection):
    """A real connection that counts the requests it sends (a pipeline is one)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def tenant_count(client: redis.Redis) -> int:
    """Submissions counted for tenant acme, over every window (one may have ended)."""
    names = client.keys("runner:rate:tenant-submissions:acme:*")
    return sum(int(v) for v in client.mget(names)) if names else 0


def limits(key_rate: int, tenant_rate: int, key_window: int = 1) -> list[Limit]:
    return [Limit("key:k1", key_rate, key_window, "requests for this API key"),
            Limit("tenant-submissions:acme", tenant_rate, 60, "submissions for tenant acme")]


def test_admit_is_one_round_trip(own_redis: redis.Redis) -> None:
    url = f"redis://127.0.0.1:{own_redis.connection_pool.connection_kwargs['port']}/0"
    counted = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
        url, connection_class=CountingConnection))
    limiter = RateLimiter(counted)
    limiter.admit(limits(100, 100), block="auth-failures:x:1.2.3.4", block_what="blocked")
    before = CountingConnection.sent
    for _ in range(10):
        limiter.admit(limits(100, 100), block="auth-failures:x:1.2.3.4", block_what="blocked")
    assert CountingConnection.sent - before == 10  # one EVALSHA each
    assert tenant_count(own_redis) == 11
    counted.close()


def test_admit_counts_like_hit_and_stops_at_the_first_refusal(own_redis: redis.Redis) -> None:
    limiter = RateLimiter(own_redis)
    # Hour-long windows: no window can end between the calls and reset a count.
    for _ in range(3):
        limiter.admit(limits(3, 100, key_window=3600))
    with pytest.raises(RateLimitedError) as refused:
        limiter.admit(limits(3, 100, key_window=3600))
    assert "requests for this API key: over 3 per 3600s" in refused.value.message
    assert 1 <= refused.value.context["retry_after"] <= 3600
    # The refused request never reached the tenant's counter, as with two `hit` calls.
    assert tenant_count(own_redis) == 3
    with pytest.raises(RateLimitedError) as over:  # the same counter through `hit`
        limiter.hit("key:k1", limit=3, window_seconds=3600, what="requests for this API key")
    assert over.value.message.startswith("requests for this API key: over 3 per 3600s")


def test_admit_refuses_a_blocked_name_before_counting(own_redis: redis.Redis) -> None:
    limiter = RateLimiter(own_redis)
    for _ in range(2):
        limiter.strike("auth-failures:x:5.6.7.8", limit=2, window_seconds=60)
    with pytest.raises(RateLimitedError) as refused:
        limiter.admit(limits(100, 100), block="auth-failures:x:5.6.7.8",
                      block_what="too many failed authentications")
    assert refused.value.message.startswith("too many failed authentications; retry after")
    assert 50 <= refused.value.context["retry_after"] <= 60
    assert own_redis.keys("runner:rate:key:*") == []  # nothing counted
    with pytest.raises(RateLimitedError):  # as check_block says
        limiter.check_block("auth-failures:x:5.6.7.8", what="blocked")


def test_admit_lets_requests_through_when_redis_is_down(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    limiter = RateLimiter(redis.Redis.from_url(server.url))
    server.stop()
    limiter.admit(limits(1, 1), block="auth-failures:x:9.9.9.9", block_what="blocked")
    limiter.admit(limits(1, 1), block="auth-failures:x:9.9.9.9", block_what="blocked")


def test_a_submission_answers_the_run_object_of_its_response_model(
        api_url: str, keys: dict[str, str], published: dict[str, dict[str, Any]]) -> None:
    """The route serializes its answer itself, once; it is what FastAPI would have made
    of `response_model=RunOut`, and what GET answers for the same run."""
    headers = {"Authorization": f"Bearer {keys['submitter']}"}
    response = httpx.post(f"{api_url}/v1/runs", headers=headers, timeout=30,
                          json={"processor": "echo", "input": {"message": "fast"},
                                "labels": {"team": "speed"}})
    assert response.status_code == 202, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["X-Request-ID"]
    body = response.json()
    assert RunOut.model_validate(body).model_dump(mode="json") == body
    assert (body["status"], body["processor"], body["labels"]) == (
        "queued", "echo", {"team": "speed"})
    again = httpx.get(f"{api_url}/v1/runs/{body['id']}", headers=headers, timeout=30).json()
    assert set(again) == set(body)
    assert {k: again[k] for k in ("id", "processor", "version", "image", "input",
                                  "created_at")} == {
        k: body[k] for k in ("id", "processor", "version", "image", "input", "created_at")}


def test_the_openapi_document_still_describes_the_submission(api_url: str) -> None:
    operation = httpx.get(f"{api_url}/openapi.json", timeout=30).json()[
        "paths"]["/v1/runs"]["post"]
    assert operation["operationId"] == "create_run"
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RunCreate"}
    assert operation["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RunOut"}
    assert {"401", "403", "422", "429", "503"} <= set(operation["responses"])
    assert operation["security"] == [{"HTTPBearer": []}]
    assert [p["name"] for p in operation["parameters"]] == ["Idempotency-Key"]
