"""The HTTP surface: validation, error shape, keys, roles and tenants (real PG + Redis)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from runner.client import ApiError, RunnerClient
from runner.control.store import Store


def post(api_url: str, key: str | None, body: Any, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{api_url}/v1/runs", json=body, headers=headers, timeout=30)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def test_unknown_processor_is_422(api_url: str, keys: dict[str, str]) -> None:
    error = assert_error(post(api_url, keys["submitter"], {"processor": "nope", "input": {}}),
                         422, "unknown_processor")
    assert error["field"] == "processor"
    error = assert_error(post(api_url, keys["submitter"],
                              {"processor": "echo", "version": "9.9.9", "input": {}}),
                         422, "unknown_processor")
    assert error["field"] == "version"


@pytest.mark.parametrize("field", ["status", "tenant", "image", "privileged", "volumes", "env"])
def test_unknown_fields_are_refused(api_url: str, keys: dict[str, str], store: Store,
                                    field: str) -> None:
    before, _ = store.list_runs(tenant="acme", limit=200)
    body = {"processor": "echo", "input": {}, field: "x"}
    error = assert_error(post(api_url, keys["submitter"], body), 422, "invalid_request")
    assert error["field"] == field
    after, _ = store.list_runs(tenant="acme", limit=200)
    assert len(after) == len(before)


def test_input_schema_failure_names_the_path(api_url: str, keys: dict[str, str]) -> None:
    error = assert_error(post(api_url, keys["submitter"],
                              {"processor": "echo", "input": {"message": 12}}),
                         422, "invalid_input")
    assert error["field"] == "input.message"
    assert "not of type 'string'" in error["message"]


def test_bad_types_name_the_field(api_url: str, keys: dict[str, str]) -> None:
    error = assert_error(post(api_url, keys["submitter"],
                              {"processor": "echo", "input": [1, 2]}), 422, "invalid_request")
    assert error["field"] == "input"
    error = assert_error(post(api_url, keys["submitter"],
                              {"processor": "echo", "input": {}, "timeout_seconds": 0}),
                         422, "invalid_request")
    assert error["field"] == "timeout_seconds"
    error = assert_error(post(api_url, keys["submitter"],
                              {"processor": "echo", "input": {}, "timeout_seconds": 3000}),
                         422, "invalid_request")
    assert error["field"] == "timeout_seconds" and "limit" in error["message"]


def test_malformed_json_is_422(api_url: str, keys: dict[str, str]) -> None:
    response = httpx.post(f"{api_url}/v1/runs", content=b"{not json",
                          headers={"Authorization": f"Bearer {keys['submitter']}",
                                   "Content-Type": "application/json"})
    assert_error(response, 422, "invalid_request")


def test_oversized_body_is_413(api_url: str, keys: dict[str, str]) -> None:
    body = {"processor": "echo", "input": {"message": "x" * (2 * 1024 * 1024)}}
    assert_error(post(api_url, keys["submitter"], body), 413, "body_too_large")


@pytest.mark.parametrize("key", [None, "rk_nothere_secret", "garbage"])
def test_missing_or_unknown_key_is_401(api_url: str, key: str | None) -> None:
    response = post(api_url, key, {"processor": "echo", "input": {}})
    assert_error(response, 401, "unauthenticated")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    get = httpx.get(f"{api_url}/v1/processors",
                    headers={"Authorization": f"Bearer {key}"} if key else {})
    assert_error(get, 401, "unauthenticated")


def test_viewer_reads_but_cannot_submit(api_url: str, keys: dict[str, str]) -> None:
    assert_error(post(api_url, keys["viewer"], {"processor": "echo", "input": {}}),
                 403, "forbidden")
    with RunnerClient(api_url, keys["viewer"]) as viewer:
        assert viewer.processors()["items"]


def test_other_tenant_sees_404(api_url: str, keys: dict[str, str],
                               client: RunnerClient) -> None:
    run = client.submit("exit", {"code": 0})
    with RunnerClient(api_url, keys["other"]) as other:
        for call in (lambda: other.run(run["id"]), lambda: other.logs(run["id"])):
            with pytest.raises(ApiError) as caught:
                call()
            assert caught.value.status == 404
        assert run["id"] not in [r["id"] for r in other.runs(limit=200)["items"]]
    assert client.run(run["id"])["id"] == run["id"]


def test_the_database_holds_no_plaintext_key(store: Store, keys: dict[str, str]) -> None:
    from sqlalchemy import text

    with store.session() as session:
        rows = session.execute(text("SELECT id, secret_hash FROM api_keys")).all()
    stored = " ".join(f"{a} {b}" for a, b in rows)
    for key in keys.values():
        secret = key.split("_", 2)[2]
        assert secret not in stored


def test_list_pagination_is_stable(client: RunnerClient) -> None:
    made = [client.submit("exit", {"code": 0}, labels={"page": "yes"})["id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        page = client.runs(processor="exit", limit=2, cursor=cursor)
        seen += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert [r for r in seen if r in made] == sorted(made, reverse=True)


def test_bad_cursor_is_422(api_url: str, keys: dict[str, str]) -> None:
    response = httpx.get(f"{api_url}/v1/runs", params={"cursor": "!!!"},
                         headers={"Authorization": f"Bearer {keys['viewer']}"})
    assert_error(response, 422, "invalid_request")


def test_unknown_run_and_route(api_url: str, keys: dict[str, str]) -> None:
    headers = {"Authorization": f"Bearer {keys['viewer']}"}
    assert_error(httpx.get(f"{api_url}/v1/runs/nope", headers=headers), 404, "not_found")
    assert_error(httpx.get(f"{api_url}/v1/nothing", headers=headers), 404, "not_found")


def test_processors_list_the_manifest(client: RunnerClient,
                                      published: dict[str, dict[str, Any]]) -> None:
    listed = client.processors()
    names = {p["name"]: p for p in listed["items"]}
    assert set(names) == set(published)
    assert names["echo"]["image"] == published["echo"]["image"]
    assert listed["manifest_revision"].startswith("sha256:")


def test_health_and_readiness(api_url: str) -> None:
    assert httpx.get(f"{api_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "manifest": "ok",
                                      "schema": "ok"}


def test_openapi_is_served(api_url: str) -> None:
    spec = httpx.get(f"{api_url}/openapi.json").json()
    assert "/v1/runs" in spec["paths"] and "/v1/runs/{run_id}/logs" in spec["paths"]


def test_label_keys_and_values_are_bounded(api_url: str, keys: dict[str, str]) -> None:
    for labels in ({"bad key!": "x"}, {"k": "v" * 300},
                   {f"k{i}": "v" for i in range(40)}):
        error = assert_error(post(api_url, keys["submitter"],
                                  {"processor": "echo", "input": {}, "labels": labels}),
                             422, "invalid_request")
        assert error["field"].startswith("labels")


def test_chunked_body_without_length_is_refused(api_url: str, keys: dict[str, str]) -> None:
    def chunks() -> Any:
        yield b'{"processor": "echo", '
        yield b'"input": {}}'

    response = httpx.post(f"{api_url}/v1/runs", content=chunks(),
                          headers={"Authorization": f"Bearer {keys['submitter']}",
                                   "Content-Type": "application/json"})
    assert_error(response, 411, "length_required")


def test_input_over_its_cap_is_refused(store: Store, settings: Any) -> None:
    from runner.control.queue import RunQueue
    from runner.control.runs import Submission, submit
    from runner.errors import InvalidRequestError
    from runner.manifest import load_manifest

    before, _ = store.list_runs(tenant="capped", limit=10)
    with pytest.raises(InvalidRequestError) as caught:
        submit(Submission(tenant="capped", processor="echo", version=None,
                          input={"message": "x" * 200}),
               manifest=load_manifest(settings.manifest), store=store,
               queue=RunQueue.from_url(settings.redis_url), default_queue="unused",
               stop_grace_seconds=1, input_max_bytes=100)
    assert caught.value.context["field"] == "input"
    assert "over the 100 byte cap" in caught.value.message
    assert store.list_runs(tenant="capped", limit=10)[0] == before == []


def test_metrics_count_what_happened(api_url: str, client: RunnerClient) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{api_url}/metrics").text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    before = scrape()
    for _ in range(3):
        client.submit("exit", {"code": 0})
    after = scrape()
    key = 'runner_runs_submitted_total{processor="exit"}'
    assert after[key] - before.get(key, 0) == 3
    posted = 'runner_api_requests_total{method="POST",route="/v1/runs",status="202"}'
    assert after[posted] - before.get(posted, 0) == 3
    assert after['runner_manifest_reloads_total{result="refused"}'] == 0
    assert any(k.startswith("runner_runs{status=") for k in after)
