"""The API against its abuse cases: an auth matrix, rate limits, quotas, keys, CORS."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.client import ApiError, RunnerClient
from runner.control.keys import KEY_CACHE_SECONDS, Keys
from runner.control.store import Store
from runner.domain import Role
from runner.settings import Settings
from tests.integration.conftest import ROOT, SESSION
from tests.support.net import free_port
from tests.support.processes import RunnerProcess, WorkerProcess, child_env


@pytest.fixture(scope="module")
def finished_run(client: RunnerClient, worker: WorkerProcess) -> dict[str, Any]:
    run = client.submit("echo", {"message": "matrix"})
    return client.wait(run["id"])


@pytest.fixture(scope="module")
def revoked_key(store: Store) -> str:
    key_info, key = Keys(store).create(tenant="acme", role=Role.ADMIN)
    assert Keys(store).revoke(key_info.id)
    return key


PRINCIPALS = ["none", "revoked", "viewer", "submitter", "admin", "other"]
# endpoint -> expected status per principal, for a finished run of tenant acme.
MATRIX: dict[str, dict[str, int]] = {
    "GET /v1/runs": dict(none=401, revoked=401, viewer=200, submitter=200, admin=200,
                         other=200),
    "GET /v1/runs/{id}": dict(none=401, revoked=401, viewer=200, submitter=200, admin=200,
                              other=404),
    "GET /v1/runs/{id}/logs": dict(none=401, revoked=401, viewer=200, submitter=200,
                                   admin=200, other=404),
    "POST /v1/runs": dict(none=401, revoked=401, viewer=403, submitter=202, admin=202,
                          other=202),
    "POST /v1/runs/{id}/cancel": dict(none=401, revoked=401, viewer=403, submitter=409,
                                      admin=409, other=404),
    "POST /v1/runs/{id}/replay": dict(none=401, revoked=401, viewer=403, submitter=202,
                                      admin=202, other=404),
    "GET /v1/processors": dict(none=401, revoked=401, viewer=200, submitter=200, admin=200,
                               other=200),
}
CASES = [(endpoint, who) for endpoint in MATRIX for who in PRINCIPALS]


@pytest.mark.parametrize(("endpoint", "who"), CASES, ids=[f"{e}-{w}" for e, w in CASES])
def test_auth_matrix(endpoint: str, who: str, api_url: str, keys: dict[str, str],
                     revoked_key: str, finished_run: dict[str, Any]) -> None:
    method, path = endpoint.split(" ")
    key = {"none": None, "revoked": revoked_key}.get(who, keys.get(who))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"processor": "exit", "input": {"code": 0}} if path == "/v1/runs" else None
    response = httpx.request(method, api_url + path.replace("{id}", finished_run["id"]),
                             json=body if method == "POST" else None, headers=headers,
                             timeout=30)
    assert response.status_code == MATRIX[endpoint][who], response.text
    if response.status_code >= 400:
        assert response.json()["error"]["request_id"] == response.headers["X-Request-ID"]
    if endpoint == "GET /v1/runs" and who == "other":
        assert finished_run["id"] not in [r["id"] for r in response.json()["items"]]


def test_revoked_key_stops_working_within_the_key_cache_period(api_url: str,
                                                              store: Store) -> None:
    """Revoked outside the API process (as `runner keys revoke` does), a key is refused
    within KEY_CACHE_SECONDS: the API remembers a valid key that long
    (tests/unit/test_key_cache.py has the rest of the cache's rules)."""
    info, key = Keys(store).create(tenant="acme", role=Role.VIEWER)
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{api_url}/v1/processors", headers=headers).status_code == 200
    listed = {k["id"]: k for k in Keys(store).list(tenant="acme")}
    assert listed[info.id]["last_used_at"] is not None
    assert key.split("_", 2)[2] not in str(listed[info.id])
    Keys(store).revoke(key)  # the whole key works as an id too
    revoked_at = time.monotonic()
    while httpx.get(f"{api_url}/v1/processors", headers=headers).status_code == 200:
        assert time.monotonic() - revoked_at < KEY_CACHE_SECONDS + 1, "still accepted"
        time.sleep(0.1)
    assert httpx.get(f"{api_url}/v1/processors", headers=headers).status_code == 401


def test_keys_cli_lists_and_revokes(settings: Settings, store: Store) -> None:
    env = child_env(settings)
    made = subprocess.run([sys.executable, "-m", "runner", "keys", "create", "--tenant",
                           f"cli-{SESSION}", "--role", "viewer"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("rk_") and len(key.split("_", 2)[2]) >= 32
    listed = subprocess.run([sys.executable, "-m", "runner", "keys", "list", "--tenant",
                             f"cli-{SESSION}"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert "active" in listed.stdout and key.split("_", 2)[2] not in listed.stdout
    revoked = subprocess.run([sys.executable, "-m", "runner", "keys", "revoke", key],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0
    again = subprocess.run([sys.executable, "-m", "runner", "keys", "revoke", key],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and again.stderr.startswith("error: no active key")


def test_burst_from_one_key_gets_429_with_retry_after(api_with: Callable[..., str],
                                                      keys: dict[str, str]) -> None:
    url = api_with(key_requests_per_second=5)
    headers = {"Authorization": f"Bearer {keys['viewer']}"}
    with httpx.Client(headers=headers, timeout=30) as http, \
            concurrent.futures.ThreadPoolExecutor(10) as pool:
        # At once, so even a slow machine puts more than 5 of them in one second.
        responses = list(pool.map(lambda _: http.get(f"{url}/v1/processors"), range(20)))
    limited = [r for r in responses if r.status_code == 429]
    assert limited and len(limited) <= 15
    assert all(r.status_code in (200, 429) for r in responses)
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].json()["error"]["code"] == "rate_limited"
    time.sleep(int(limited[0].headers["Retry-After"]) + 0.1)
    assert httpx.get(f"{url}/v1/processors", headers=headers).status_code == 200


def test_tenant_submissions_per_minute(api_with: Callable[..., str], store: Store) -> None:
    url = api_with(tenant_submissions_per_minute=3, queue=f"parked-{SESSION}")
    _, key = Keys(store).create(tenant=f"spm-{SESSION}", role=Role.SUBMITTER)
    statuses = []
    with RunnerClient(url, key) as client:
        for _ in range(7):  # even split across two minute windows, one has four
            try:
                client.submit("echo", {})
                statuses.append(202)
            except ApiError as exc:
                statuses.append(exc.status)
                assert exc.code == "rate_limited"
    assert set(statuses) == {202, 429}
    assert 3 <= statuses.count(202) <= 6


@pytest.fixture
def two_api_processes(settings: Settings, tmp_path: Path) -> Iterator[list[str]]:
    """Two real `runner api` processes sharing PostgreSQL and Redis."""
    procs: list[RunnerProcess] = []
    try:
        for i in range(2):  # both start, then both are waited on
            port = free_port()
            env = child_env(settings, RUNNER_API_PORT=str(port),
                            RUNNER_QUEUE=f"parked-{SESSION}",
                            RUNNER_TENANT_MAX_ACTIVE_RUNS="5",
                            RUNNER_TENANT_SUBMISSIONS_PER_MINUTE="0",
                            RUNNER_KEY_REQUESTS_PER_SECOND="0")
            procs.append(RunnerProcess(f"api{i}", ["api"], env=env,
                                       log_path=tmp_path / f"api{i}.log",
                                       url=f"http://127.0.0.1:{port}"))
        for proc in procs:
            proc.wait_ready(url=proc.url, timeout=60)
        yield [str(proc.url) for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


def test_tenant_cap_holds_across_api_processes(two_api_processes: list[str],
                                               store: Store) -> None:
    tenant = f"cap-{SESSION}"
    _, key = Keys(store).create(tenant=tenant, role=Role.SUBMITTER)
    headers = {"Authorization": f"Bearer {key}"}

    def post(i: int) -> httpx.Response:
        return httpx.post(f"{two_api_processes[i % 2]}/v1/runs", headers=headers, timeout=60,
                          json={"processor": "echo", "input": {"i": str(i)}})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(30)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(202) == 5, codes
    assert codes.count(429) == 25, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert "Retry-After" in refused.headers
    runs, _ = store.list_runs(tenant=tenant, limit=100)
    assert len(runs) == 5


def test_cors_is_off_by_default_and_allowlisted_when_set(api_url: str,
                                                         api_with: Callable[..., str]) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    closed = httpx.options(f"{api_url}/v1/processors", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    url = api_with(cors_origins="https://app.example")
    opened = httpx.options(f"{url}/v1/processors", headers=preflight)
    assert opened.headers["access-control-allow-origin"] == "https://app.example"
    stranger = httpx.options(f"{url}/v1/processors",
                             headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in stranger.headers


def test_list_filters_by_label_and_time(client: RunnerClient) -> None:
    tag = uuid.uuid4().hex[:8]
    before = time.time()
    made = [client.submit("exit", {"code": 0}, labels={"batch": tag, "n": str(i)})["id"]
            for i in range(3)]
    assert [r["id"] for r in client.runs(label=f"batch={tag}", limit=10)["items"]] == made[::-1]
    assert [r["id"] for r in client.runs(label=[f"batch={tag}", "n=1"])["items"]] == [made[1]]
    from datetime import UTC, datetime

    after = datetime.fromtimestamp(before, UTC).isoformat()
    recent = client.runs(created_after=after, label=f"batch={tag}")["items"]
    assert len(recent) == 3
    assert client.runs(created_before=after, label=f"batch={tag}")["items"] == []


def test_live_logs_arrive_before_the_run_ends(client: RunnerClient,
                                              worker: WorkerProcess) -> None:
    run = client.submit("sleep", {"seconds": 10})  # room for a slow GET after the first line
    stream = client.follow_logs(run["id"])
    first = next(stream)
    status_when_seen = client.run(run["id"])["status"]
    rest = b"".join(stream)
    assert first.startswith(b"sleeping 10")
    assert status_when_seen == "running"
    assert client.run(run["id"])["status"] == "succeeded"
    assert first + rest == client.logs(run["id"])


def test_follow_resumes_from_an_offset(client: RunnerClient, worker: WorkerProcess) -> None:
    run = client.wait(client.submit("echo", {"message": "resume"})["id"])
    whole = client.logs(run["id"])
    assert b"".join(client.follow_logs(run["id"], offset=5)) == whole[5:]


@pytest.mark.timeout(1200)  # its own subprocess timeout (900 s) is the real bound
def test_schemathesis_finds_no_5xx_and_no_schema_violation(
        api_with: Callable[..., str], store: Store, tmp_path: Any) -> None:
    """Property-based requests from /openapi.json against a real stack.

    The fuzzed API serves a queue no worker reads, so generated runs never execute,
    and follow streams end after 1 s. `positive_data_acceptance` is excluded: that
    a processor name exists in the manifest, or an input fits its processor's schema,
    is not expressible in a static OpenAPI document.
    """
    url = api_with(queue=f"fuzz-{SESSION}", follow_max_seconds=1,
                   key_requests_per_second=0, tenant_submissions_per_minute=0)
    _, key = Keys(store).create(tenant=f"fuzz-{SESSION}", role=Role.SUBMITTER)
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run",
         f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--max-examples", "40",
         "--seed", "7", "--no-color", "--report", "junit", "--report-junit-path",
         str(report)], capture_output=True, text=True, timeout=900)
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    # Clean, or warned only that an operation's ids could not be found (an artifact
    # name of a generated run: its runs never execute, so they leave none).
    warned = re.findall(r"⚠️ (.+)", summary)
    assert "No issues found" in summary or (
        warned and all(w.startswith("Missing test data") for w in warned)
        and re.search(r"\d+ passed", summary)), summary
    generated = re.search(r"(\d+) generated", summary)
    assert generated is not None and int(generated.group(1)) >= 300, summary
    # not_a_server_error is among --checks all: a single 5xx would have failed the run.
    print(f"schemathesis: {generated.group(1)} cases, 0 failures")
