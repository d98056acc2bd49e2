"""Logs, metrics, traces and health of a real API and a real worker process.

The stack here has its own Redis server (so it can be stopped), its own queue and
processor names, an API in this process whose tracer exports to memory, and a worker
process that serves its metrics port and writes its spans to a JSON-lines file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from api.app import create_app
from api.deps import Services
from runner.client import RunnerClient
from runner.control.keys import Keys
from runner.control.store import Store
from runner.domain import Role
from runner.settings import Settings, load_settings
from tests.integration.conftest import REGISTRY, SESSION, write_manifest
from tests.integration.reliability import TcpProxy
from tests.support.net import free_port
from tests.support.processes import WorkerProcess
from tests.support.services import ApiServer, RedisServer
from tests.support.waiting import WaitTimeout, wait_until

STAGES = ["pull", "create", "start", "wait", "collect", "remove"]
STAGE_EVENTS = ["container.pulled", "container.created", "container.started",
                "container.exited", "container.collected", "container.removed"]


@pytest.fixture(scope="module")
def obs_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("obs-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def obs_settings(database_url: str, obs_redis: RedisServer, published: dict[str, Any],
                 tmp_path_factory: pytest.TempPathFactory) -> Settings:
    def like(name: str, image_of: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "version": "1.0.0", "image": published[image_of]["image"],
                "limits": published[image_of].get("limits", {}), **extra}

    entries = {
        "obs-echo": like("obs-echo", "echo"),
        "obs-exit": like("obs-exit", "exit"),
        "obs-retry": like("obs-retry", "exit", retry={
            "max_attempts": 2, "backoff": {"initial": "100ms", "max": "200ms"},
            "on": ["exit:75"]}),
    }
    directory = tmp_path_factory.mktemp("obs")
    return load_settings(
        database_url=database_url, redis_url=obs_redis.url,
        manifest=write_manifest(directory / "manifest.yaml", entries),
        queue=f"obs-{SESSION}", registry=REGISTRY, stop_grace_seconds=1,
        worker_id=f"obs-{SESSION}", log_format="json", worker_port=free_port(),
        trace_exporter="jsonl", trace_file=directory / "worker-spans.jsonl",
        reconcile_interval_seconds=1, reconcile_grace_seconds=1)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def obs_api(obs_settings: Settings, spans: InMemorySpanExporter) -> Iterator[str]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    services = Services.build(obs_settings, tracer=provider.get_tracer("test-api"))
    server = ApiServer(obs_settings, app=create_app(obs_settings, services))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def obs_worker(obs_settings: Settings, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[WorkerProcess]:
    env = {"RUNNER_WORKER_PORT": str(obs_settings.worker_port),
           "RUNNER_TRACE_EXPORTER": "jsonl", "RUNNER_TRACE_FILE": str(obs_settings.trace_file)}
    process = WorkerProcess(obs_settings, tmp_path_factory.mktemp("obs-w") / "worker.log",
                            env=env)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def obs_client(obs_api: str, store: Store) -> Iterator[RunnerClient]:
    key = Keys(store).create(tenant=f"obs-{SESSION}", role=Role.SUBMITTER)[1]
    with RunnerClient(obs_api, key) as client:
        yield client


@pytest.fixture(scope="module")
def finished_runs(obs_client: RunnerClient, obs_worker: WorkerProcess,
                  obs_settings: Settings) -> dict[str, dict[str, Any]]:
    """The known set of runs every test below counts on."""
    submitted = {
        "echo-1": obs_client.submit("obs-echo", {"message": "one"}),
        "echo-2": obs_client.submit("obs-echo", {"message": "two"}),
        "echo-3": obs_client.submit("obs-echo", {"message": "three"}),
        "exit-3": obs_client.submit("obs-exit", {"code": 3}),
        "retry-75": obs_client.submit("obs-retry", {"code": 75}),
    }
    finished = {name: obs_client.wait(run["id"], timeout=180)
                for name, run in submitted.items()}
    # The last run's end wakes the client a moment before its worker has left it
    # (gauges, health counts): the tests below count on an idle worker.
    wait_until(lambda: not httpx.get(worker_url(obs_settings, "/healthz"),
                                     timeout=10).json()["current_run"],
               timeout=30, interval=0.1, message="the worker never went idle")
    return finished


def worker_url(settings: Settings, path: str) -> str:
    return f"http://127.0.0.1:{settings.worker_port}{path}"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_the_known_runs_ended_as_expected(finished_runs: dict[str, dict[str, Any]]) -> None:
    statuses = {name: run["status"] for name, run in finished_runs.items()}
    assert statuses == {"echo-1": "succeeded", "echo-2": "succeeded", "echo-3": "succeeded",
                        "exit-3": "failed", "retry-75": "dead_letter"}
    assert finished_runs["retry-75"]["attempt"] == 2


def test_every_worker_line_is_json_and_every_line_of_a_run_carries_its_id(
        finished_runs: dict[str, dict[str, Any]], obs_worker: WorkerProcess) -> None:
    lines = [json.loads(line) for line in obs_worker.log().splitlines() if line.strip()]
    for line in lines:  # one schema for every line, the library ones included
        assert {"ts", "level", "service", "event"} <= line.keys(), line
        assert line["service"] == "worker"
    run_id = finished_runs["echo-2"]["id"]
    first = next(i for i, line in enumerate(lines) if line.get("run_id") == run_id)
    last = max(i for i, line in enumerate(lines) if line.get("run_id") == run_id)
    # Between a run's first and last line, every line names a run (the container of
    # the previous run may be removed in the background meanwhile) ...
    between = [line for line in lines[first:last + 1]
               if not line["event"].startswith(("reconcile", "images_prefetched"))]
    assert all(line.get("run_id") for line in between), [
        line for line in between if not line.get("run_id")]
    # ... and the run's own lines tell its whole story.
    window = [line for line in between if line["run_id"] == run_id]
    events = [line["event"] for line in window]
    for event in ["run_claimed", *STAGE_EVENTS, "run_finished"]:
        assert event in events
    stage_lines = [line for line in window if line["event"] in STAGE_EVENTS]
    assert all(isinstance(line["duration_ms"], float | int) for line in stage_lines)
    assert all(line["attempt"] == 1 and line["worker_id"] == f"obs-{SESSION}"
               and len(line["trace_id"]) == 32 for line in window)
    created = next(line for line in window if line["event"] == "container.created")
    assert created["dequeue_to_create_ms"] >= 0
    transitions = [(line["from"], line["to"]) for line in window
                   if line["event"] == "run.transition"]
    assert transitions == [("queued", "running"), ("running", "succeeded")]


def test_a_scrape_counts_the_known_runs(finished_runs: dict[str, dict[str, Any]],
                                        obs_settings: Settings, obs_api: str) -> None:
    worker = samples(httpx.get(worker_url(obs_settings, "/metrics")).text)
    assert value(worker, "runner_runs_finished_total", processor="obs-echo",
                 status="succeeded") == 3
    assert value(worker, "runner_runs_finished_total", processor="obs-exit",
                 status="failed") == 1
    assert value(worker, "runner_runs_finished_total", processor="obs-retry",
                 status="dead_letter") == 1
    assert value(worker, "runner_retries_total", processor="obs-retry",
                 error_code="nonzero_exit") == 1
    assert value(worker, "runner_dead_letters_total", processor="obs-retry",
                 error_code="nonzero_exit") == 1
    assert value(worker, "runner_run_duration_seconds_count", processor="obs-echo",
                 status="succeeded") == 3
    assert value(worker, "runner_queue_wait_seconds_count", processor="obs-echo") == 3
    for name in ("runner_container_create_seconds_count",
                 "runner_container_start_seconds_count",
                 "runner_dequeue_to_create_seconds_count"):
        assert value(worker, name) == 6, name  # 3 + 1 + 2 attempts
    assert value(worker, "runner_runs_running") == 0
    assert value(worker, "runner_queue_depth", queue=obs_settings.queue) == 0
    assert value(worker, "runner_manifest_reloads_total", result="refused") == 0
    api = samples(httpx.get(f"{obs_api}/metrics").text)
    assert value(api, "runner_runs_submitted_total", processor="obs-echo") == 3
    assert value(api, "runner_runs_submitted_total", processor="obs-retry") == 1
    assert value(api, "runner_api_requests_total", method="POST", route="/v1/runs",
                 status="202") == 5
    assert value(api, "runner_runs", status="dead_letter") >= 1
    assert value(api, "runner_queue_depth", queue=obs_settings.queue) == 0


def test_the_span_tree_of_one_run_crosses_api_and_worker(
        finished_runs: dict[str, dict[str, Any]], obs_settings: Settings,
        spans: InMemorySpanExporter) -> None:
    run_id = finished_runs["echo-1"]["id"]
    submits = [s for s in spans.get_finished_spans() if s.name == "POST /v1/runs"]
    assert submits
    worker_spans: list[dict[str, Any]] = []
    attempt: list[dict[str, Any]] = []

    def whole_tree() -> bool:  # the remove span may end after the attempt's
        worker_spans[:] = [json.loads(line) for line in
                           Path(obs_settings.trace_file).read_text().splitlines()]
        attempt[:] = [s for s in worker_spans if s["name"] == "run.attempt"
                      and s["attributes"].get("runner.run_id") == run_id]
        return bool(attempt) and sum(s["parent_id"] == attempt[0]["span_id"]
                                     for s in worker_spans) == 1 + len(STAGES)

    with contextlib.suppress(WaitTimeout):  # the assertions below say what is missing
        wait_until(whole_tree, timeout=30, interval=0.2)
    assert len(attempt) == 1
    root = attempt[0]
    api_span = next(s for s in submits
                    if format(s.get_span_context().trace_id, "032x") == root["trace_id"])
    assert root["parent_id"] == format(api_span.get_span_context().span_id, "016x")
    assert api_span.parent is None  # the trace starts at the API request
    assert root["service"] == "runner-worker"
    children = [s for s in worker_spans if s["parent_id"] == root["span_id"]]
    assert [s["name"] for s in sorted(children, key=lambda s: s["start_ns"])] == \
        ["claim", *STAGES]
    assert all(s["trace_id"] == root["trace_id"] for s in children)
    assert all(s["status"] != "ERROR" for s in children)
    # A retried run keeps its trace: both attempts under the same submission.
    retried = [s for s in worker_spans if s["name"] == "run.attempt"
               and s["attributes"].get("runner.run_id") == finished_runs["retry-75"]["id"]]
    assert sorted(s["attributes"]["runner.attempt"] for s in retried) == [1, 2]
    assert len({(s["trace_id"], s["parent_id"]) for s in retried}) == 1


def test_worker_healthz_reports_its_last_run_and_counts(
        finished_runs: dict[str, dict[str, Any]], obs_settings: Settings) -> None:
    body = httpx.get(worker_url(obs_settings, "/healthz")).json()
    assert body["status"] == "ok" and body["worker_id"] == f"obs-{SESSION}"
    assert body["runs"] == {"succeeded": 3, "failed": 1, "retried": 1,
                            "dead_letter": 1}
    assert body["last_run_at"] is not None and body["current_run"] is None
    assert httpx.get(worker_url(obs_settings, "/nope")).status_code == 404


def ready_statuses(urls: dict[str, str], *, until_ready: float = 0) -> dict[str, int]:
    """Each /readyz's status code; with `until_ready`, polled for up to that many
    seconds until every one is 200 (a recovery takes a moment)."""
    status: dict[str, int] = {}

    def all_ready() -> bool:
        status.update({name: httpx.get(url, timeout=20).status_code
                       for name, url in urls.items()})
        return set(status.values()) == {200}

    with contextlib.suppress(WaitTimeout):  # then the caller's assertion shows them
        wait_until(all_ready, timeout=until_ready, interval=0.5)
    return status


def test_readyz_goes_red_without_redis_and_green_when_it_is_back(
        finished_runs: dict[str, dict[str, Any]], obs_settings: Settings, obs_api: str,
        obs_redis: RedisServer, obs_client: RunnerClient) -> None:
    urls = {"api": f"{obs_api}/readyz", "worker": worker_url(obs_settings, "/readyz")}
    for url in urls.values():
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, response.text
        assert set(response.json()["checks"].values()) == {"ok"}
    assert set(httpx.get(urls["worker"]).json()["checks"]) == {
        "docker", "redis", "database", "manifest"}
    obs_redis.stop()
    try:
        for name, url in urls.items():
            response = httpx.get(url, timeout=10)
            assert response.status_code == 503, (name, response.text)
            checks = response.json()["checks"]
            assert checks["redis"] != "ok" and checks["database"] == "ok", (name, checks)
    finally:
        obs_redis.start()
    assert ready_statuses(urls, until_ready=30) == {"api": 200, "worker": 200}
    # And the worker still works after the outage.
    run = obs_client.submit("obs-echo", {"message": "after"})
    assert obs_client.wait(run["id"], timeout=120)["status"] == "succeeded"


def test_readyz_goes_red_without_the_database_and_green_when_it_is_back(
        obs_settings: Settings, store: Store, tmp_path: Path) -> None:
    # Its own API and worker, whose every database connection goes through a proxy
    # the test cuts: the shared PostgreSQL other tests use stays up.
    url = make_url(obs_settings.database_url)
    assert url.host is not None and url.port is not None
    proxy = TcpProxy(url.host, url.port)
    proxy.up()
    settings = obs_settings.model_copy(update={
        "database_url": url.set(host="127.0.0.1", port=proxy.port)
                           .render_as_string(hide_password=False),
        "worker_port": free_port(), "worker_id": f"obs-db-{SESSION}",
        "queue": f"obs-db-{SESSION}"})
    api = ApiServer(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log",
                           env={"RUNNER_WORKER_PORT": str(settings.worker_port)})
    urls = {"api": f"{api.url}/readyz", "worker": worker_url(settings, "/readyz")}
    try:
        assert ready_statuses(urls) == {"api": 200, "worker": 200}
        cut_at = len(worker.log())
        proxy.down()
        started = time.monotonic()
        for name, u in urls.items():
            response = httpx.get(u, timeout=20)
            assert response.status_code == 503, (name, response.text)
            checks = response.json()["checks"]
            assert checks["database"].startswith("database unavailable"), (name, checks)
            assert checks["redis"] == "ok" and checks["manifest"] == "ok", (name, checks)
        assert time.monotonic() - started < 15  # refused at once, not hung on a timeout
        # The worker's reconciler loop meets the outage too, and the worker lives on:
        # three failed passes in a row (half-second requeue passes, and at least one
        # full pass among any three).
        wait_until(lambda: len(worker.events("reconcile_failed", since=cut_at)) >= 3,
                   timeout=30, interval=0.1,
                   message=lambda: f"the worker's reconciler never met the outage:\n"
                                   f"{worker.tail(2000)}")
        assert worker.process.poll() is None, worker.log()[-2000:]
        proxy.up()
        assert ready_statuses(urls, until_ready=30) == {"api": 200, "worker": 200}
        # Both recovered by themselves: a run goes through the API and the worker.
        key = Keys(store).create(tenant=f"obs-db-{SESSION}", role=Role.SUBMITTER)[1]
        with RunnerClient(api.url, key) as client:
            run = client.submit("obs-echo", {"message": "after the outage"})
            assert client.wait(run["id"], timeout=120)["status"] == "succeeded"
    finally:
        worker.stop()
        api.stop()
        proxy.down()
