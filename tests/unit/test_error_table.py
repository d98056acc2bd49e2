"""The API's one mapping from the runner's error tree to HTTP (`api.errors`), for every
error class in runner/errors.py, on a bare FastAPI app: no server, no services."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import structlog
import structlog.testing
from fastapi import FastAPI

from api.errors import install_error_handlers
from runner import errors
from runner.errors import RunnerError

with warnings.catch_warnings():
    # Starlette's test client warns, on import, that it would rather use httpx2.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

# What the API answers for each error of the tree: (HTTP status, error body code).
# Written out, not derived from api.errors, so a change to the mapping shows up here.
INTERNAL = (500, "internal_error")
EXPECTED: dict[type[RunnerError], tuple[int, str]] = {
    errors.RunnerError: INTERNAL,
    errors.ConfigError: INTERNAL,
    errors.ManifestError: INTERNAL,
    errors.NotFoundError: (404, "not_found"),
    errors.InvalidRequestError: (422, "invalid_request"),
    errors.UnknownProcessorError: (422, "unknown_processor"),
    errors.InvalidInputError: (422, "invalid_input"),
    errors.ConflictError: (409, "conflict"),
    errors.PayloadTooLargeError: (413, "file_too_large"),
    errors.RangeNotSatisfiableError: (416, "range_not_satisfiable"),
    errors.StorageError: (503, "storage_unavailable"),
    errors.AuthenticationError: (401, "unauthenticated"),
    errors.PermissionDeniedError: (403, "forbidden"),
    errors.RateLimitedError: (429, "rate_limited"),
    errors.QuotaExceededError: (429, "quota_exceeded"),
    errors.ServiceUnavailableError: (503, "unavailable"),
    errors.SandboxError: INTERNAL,
    errors.DockerUnavailableError: INTERNAL,
    errors.ImagePullError: INTERNAL,
    errors.DigestMismatchError: INTERNAL,
    errors.ImageNotAllowedError: INTERNAL,
    errors.SandboxMismatchError: INTERNAL,
    errors.PublishError: INTERNAL,
}


def error_tree() -> list[type[RunnerError]]:
    """RunnerError and every subclass of it defined in runner/errors.py, recursively."""
    found: list[type[RunnerError]] = []
    todo: list[type[RunnerError]] = [RunnerError]
    while todo:
        cls = todo.pop(0)
        if cls.__module__ == errors.__name__ and cls not in found:
            found.append(cls)
        todo += cls.__subclasses__()
    return found


TREE = {cls.__name__: cls for cls in error_tree()}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{name}")
    def raise_error(name: str, field: str | None = None,
                    retry_after: int | None = None) -> None:
        context: dict[str, object] = {}
        if field is not None:
            context["field"] = field
        if retry_after is not None:
            context["retry_after"] = retry_after
        raise TREE[name](f"message of {name}", **context)

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("a secret detail of the crash")

    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_the_table_covers_the_whole_error_tree() -> None:
    assert set(TREE.values()) == set(EXPECTED)
    assert len(TREE) > 10  # the walk found the tree, not just its root


@pytest.mark.parametrize("name", sorted(TREE))
def test_each_error_maps_to_its_status_and_code(name: str, client: TestClient) -> None:
    status, code = EXPECTED[TREE[name]]
    response = client.get(f"/raise/{name}")
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code
    if status == 500:  # the details go to the log, never to the client
        assert body["error"]["message"] == "internal error"
        assert name not in response.text
    else:
        assert body["error"]["message"] == f"message of {name}"
    assert (response.headers.get("www-authenticate") == "Bearer") is (status == 401)
    assert ("retry-after" in response.headers) is (status == 429)


def test_a_field_is_named_in_the_body(client: TestClient) -> None:
    response = client.get("/raise/InvalidInputError", params={"field": "input.x"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "input.x"


@pytest.mark.parametrize(("params", "header"), [({}, "1"), ({"retry_after": 7}, "7")])
def test_rate_limits_say_when_to_retry(params: dict[str, int], header: str,
                                       client: TestClient) -> None:
    response = client.get("/raise/QuotaExceededError", params=params)
    assert response.status_code == 429
    assert response.headers["retry-after"] == header


def test_an_unknown_exception_is_a_generic_500(client: TestClient) -> None:
    with structlog.testing.capture_logs() as logged:
        response = client.get("/crash")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error",
                                         "message": "internal error", "request_id": ""}}
    assert "secret" not in response.text
    assert [e["event"] for e in logged if e["log_level"] == "error"] == ["request_crashed"]


def test_an_unknown_route_gets_the_same_body(client: TestClient) -> None:
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
