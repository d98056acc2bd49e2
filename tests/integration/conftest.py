"""Real services for integration tests: Docker, Redis, PostgreSQL and the registry.

`make test` starts them (scripts/services.sh); a missing one fails the session, it is
never skipped. Each session gets its own PostgreSQL database and RQ queue name, so
it cannot disturb a dev stack sharing the same servers. At its end the session checks
that no runner container of its own is left, then removes any that are.

The helpers themselves (processes, servers, waiting) are in tests/support.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest
import redis

from runner.authoring.publish import publish
from runner.client import RunnerClient
from runner.control.keys import Keys
from runner.control.ledger import Ledger
from runner.control.lifecycle import Lifecycle
from runner.control.queue import RunQueue
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.domain import Role, Run
from runner.execution.executor import Executor
from runner.execution.wiring import sandbox_config
from runner.manifest import ManifestSource
from runner.manifest.yamlio import dump_manifest
from runner.sandbox import MANAGED_LABEL, RUN_LABEL, WORKER_LABEL, Sandbox, SandboxConfig
from runner.settings import Settings, load_settings
from tests.support.processes import WorkerProcess
from tests.support.services import ApiServer, RedisServer, scratch_database
from tests.support.waiting import WaitTimeout, wait_until

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("RUNNER_TEST_PG_URL", "postgresql://runner:runner@127.0.0.1:5439/runner")
REDIS_URL = os.environ.get("RUNNER_TEST_REDIS_URL", "redis://127.0.0.1:6390/0")
REGISTRY = os.environ.get("RUNNER_TEST_REGISTRY", "127.0.0.1:5000")
SESSION = secrets.token_hex(4)
PROCESSOR_DIRS = [*sorted((ROOT / "processor-templates" / "samples").iterdir()),
                  *sorted((ROOT / "tests" / "processors").iterdir())]
# Tighter limits than the samples' own, so the tests are quick and deterministic.
OVERRIDES: dict[str, dict[str, Any]] = {
    "sleep": {"limits": {"timeout": "60s"}},
    "logflood": {"limits": {"log_bytes": "1Mi", "timeout": "120s"}},
    "memhog": {"limits": {"memory": "64Mi"}},
}
# Workers remove a finished run's container in the background, just after the run's
# end is recorded: how long the session's end waits for the last ones to go.
LEFTOVER_GRACE_SECONDS = 30


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with scratch_database(PG_URL, f"runner_test_{SESSION}") as url:
        yield url


@pytest.fixture(scope="session")
def published(docker_client: docker.DockerClient) -> dict[str, dict[str, Any]]:
    """Every sample and test processor, built on the local bases and pushed by digest."""
    entries = {}
    for path in PROCESSOR_DIRS:
        entry = publish(path, registry=REGISTRY, client=docker_client, local_base=True)
        for key, value in OVERRIDES.get(entry["name"], {}).items():
            entry[key] = {**entry.get(key, {}), **value}
        entries[entry["name"]] = entry
    # The file tests' processor under the rules they check: a narrow `accepts`, and
    # one that must never be reused.
    work = entries["filework"]
    entries["textonly"] = {**work, "name": "textonly", "accepts": {
        "media_types": ["text/*"], "max_bytes": "64Ki", "max_files": 2}}
    entries["filework-fresh"] = {**work, "name": "filework-fresh", "reusable": False}
    return entries


def write_manifest(path: Path, entries: dict[str, dict[str, Any]]) -> Path:
    path.write_text(dump_manifest({"version": 1, "processors": list(entries.values())}))
    return path


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory: pytest.TempPathFactory,
                  published: dict[str, dict[str, Any]]) -> Path:
    return write_manifest(tmp_path_factory.mktemp("manifest") / "manifest.yaml", published)


@pytest.fixture(scope="session")
def settings(database_url: str, manifest_path: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(database_url=database_url, redis_url=REDIS_URL,
                         manifest=manifest_path, queue=f"test-{SESSION}", registry=REGISTRY,
                         stop_grace_seconds=1, worker_id=f"test-worker-{SESSION}",
                         log_format="json", file_dir=tmp_path_factory.mktemp("files"))


@pytest.fixture(scope="session")
def store(settings: Settings) -> Iterator[Store]:
    store = Store(settings.database_url)
    yield store
    store.close()


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    return client


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    process = WorkerProcess(settings, tmp_path_factory.mktemp("worker") / "worker.log")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def api_url(settings: Settings) -> Iterator[str]:
    server = ApiServer(settings)
    yield server.url
    server.stop()


@pytest.fixture
def api_with(settings: Settings) -> Iterator[Callable[..., str]]:
    """Start an extra API server with some settings changed; stopped after the test."""
    servers: list[ApiServer] = []

    def go(**changes: Any) -> str:
        server = ApiServer(settings.model_copy(update=changes))
        servers.append(server)
        return server.url

    yield go
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def keys(store: Store) -> dict[str, str]:
    """Plaintext keys: one per role in tenant "acme", and an admin of tenant "other"."""
    made = {role.value: Keys(store).create(tenant="acme", role=role)[1] for role in Role}
    made["other"] = Keys(store).create(tenant="other", role=Role.ADMIN)[1]
    return made


@pytest.fixture(scope="session")
def client(api_url: str, keys: dict[str, str]) -> Iterator[RunnerClient]:
    with RunnerClient(api_url, keys["submitter"]) as made:
        yield made


@pytest.fixture
def run_and_wait(client: RunnerClient, worker: WorkerProcess
                 ) -> Callable[..., dict[str, Any]]:
    """Submit through the API, let the real worker run it, return the final run."""
    def go(processor: str, input: dict[str, Any] | None = None, **options: Any
           ) -> dict[str, Any]:
        run = client.submit(processor, input or {}, **options)
        return client.wait(run["id"], timeout=180)
    return go


def bare_sandbox_config(settings: Settings) -> SandboxConfig:
    """For a test that drives a Sandbox itself: its containers belong to no run, so
    under the session's instance the session worker's reconciler would sweep any that
    outlived its grace on a slow machine; a deployment of their own keeps them apart."""
    return replace(sandbox_config(settings), instance=f"bare-{SESSION}")


def containers_of(client: docker.DockerClient, run_id: str) -> list[Any]:
    # sparse: no per-container inspect, which races with containers being removed
    return list(client.containers.list(all=True, sparse=True,
                                       filters={"label": f"{RUN_LABEL}={run_id}"}))


def running_container(client: docker.DockerClient, run_id: str, timeout: float = 60) -> Any:
    """The run's container once it is running."""
    def running() -> Any:
        return next((c for c in containers_of(client, run_id) if c.status == "running"),
                    None)

    return wait_until(running, timeout=timeout, message=f"no running container for {run_id}")


def still_there(list_them: Callable[[], Iterable[Any]], timeout: float,
                interval: float = 0.1) -> list[Any]:
    """What `list_them` still lists after up to `timeout` seconds of waiting for it to
    list nothing (an empty list as soon as it does)."""
    left: list[Any] = []

    def gone() -> bool:
        left[:] = list_them()
        return not left

    with contextlib.suppress(WaitTimeout):
        wait_until(gone, timeout=timeout, interval=interval)
    return left


def containers_left(client: docker.DockerClient, run_id: str, timeout: float = 20
                    ) -> list[Any]:
    """The run's containers still there after `timeout`: workers remove a finished
    container in the background, just after recording the run's end."""
    return still_there(lambda: containers_of(client, run_id), timeout)


def session_containers(client: docker.DockerClient) -> list[Any]:
    """Runner containers made by this test session (its workers carry SESSION in the id)."""
    return [c for c in client.containers.list(all=True, sparse=True,
                                              filters={"label": MANAGED_LABEL})
            if SESSION in (c.attrs.get("Labels") or {}).get(WORKER_LABEL, "")]


@pytest.fixture(scope="session", autouse=True)
def remove_leftover_containers() -> Iterator[None]:
    """At session end (after every other fixture, workers included, has stopped) the
    whole suite may have left no runner container behind: a failure of the session if
    one is still there after the grace for background removals. Whatever is left is
    then removed (by our label), so a failed run leaves nothing either."""
    yield
    client = docker.from_env()
    try:
        left = still_there(lambda: session_containers(client), LEFTOVER_GRACE_SECONDS,
                           interval=0.2)
        assert left == [], [c.name for c in left]
    finally:
        for container in session_containers(client):
            container.remove(force=True, v=True)


# Reliability fixtures: their own Redis server (so it can be flushed and restarted
# without touching anything else), short leases, and workers started per test.

@pytest.fixture(scope="session")
def rel_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def rel_entries(published: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The reliability suite's processors: sample images under retry policies.

    Names differ from the main manifest's: the main stack's reconciler shares the
    database and leaves runs of processors its manifest does not know alone.
    """
    def like(image_of: str, **entry: Any) -> dict[str, Any]:
        base = published[image_of]
        return {"image": base["image"], "version": "1.0.0",
                "limits": {**base.get("limits", {}), **entry.pop("limits", {})}, **entry}

    fast = {"initial": "100ms", "max": "300ms"}
    return {
        "rel-echo": like("echo", name="rel-echo",
                     retry={"max_attempts": 3, "backoff": fast, "on": ["worker_lost"]}),
        "slow": like("sleep", name="slow", retry={"max_attempts": 4, "backoff": fast,
                                                  "on": ["worker_lost", "docker_unavailable"]}),
        "exit": like("exit", name="exit",
                     retry={"max_attempts": 3, "backoff": fast, "on": ["exit:75"]}),
        "fixme": like("exit", name="fixme",
                      retry={"max_attempts": 2, "backoff": fast, "on": ["exit:75"]}),
        "flaky-timeout": like("sleep", name="flaky-timeout", limits={"timeout": "1s"},
                              retry={"max_attempts": 2,
                                     "backoff": {"initial": "2s", "max": "2s"},
                                     "on": ["timeout"]}),
        "capped": like("sleep", name="capped", max_concurrency=2),
        "capped5": like("echo", name="capped5", max_concurrency=5),
        "retry-storm": like("exit", name="retry-storm",
                            retry={"max_attempts": 40, "on": ["exit:75"],
                                   "backoff": {"initial": "10ms", "max": "20ms"}}),
        "docker-flaky": like("echo", name="docker-flaky",
                             retry={"max_attempts": 5, "backoff": {"initial": "1s",
                                                                   "max": "1s"},
                                    "on": ["docker_unavailable"]}),
    }


@pytest.fixture(scope="session")
def rel_manifest(tmp_path_factory: pytest.TempPathFactory,
                 published: dict[str, dict[str, Any]]) -> Path:
    return write_manifest(tmp_path_factory.mktemp("rel") / "manifest.yaml",
                          rel_entries(published))


@pytest.fixture(scope="session")
def rel_settings(database_url: str, rel_manifest: Path, rel_redis: RedisServer,
                 settings: Settings) -> Settings:
    # The same database as the main stack's, so the same file store.
    return load_settings(database_url=database_url, redis_url=rel_redis.url,
                         file_dir=settings.file_dir,
                         manifest=rel_manifest, queue=f"rel-{SESSION}", registry=REGISTRY,
                         stop_grace_seconds=1, worker_id=f"rel-{SESSION}", log_format="json",
                         lease_seconds=5, heartbeat_seconds=0.5, drain_timeout_seconds=3,
                         reconcile_interval_seconds=1, reconcile_grace_seconds=1)


@pytest.fixture
def start_worker(rel_settings: Settings, tmp_path: Path
                 ) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes on the reliability queue; all stopped after the test."""
    started: list[WorkerProcess] = []

    def go(name: str = "w", *, args: list[str] | None = None,
           env: dict[str, str] | None = None, wait_started: bool = True,
           faults: Iterable[str] = ()) -> WorkerProcess:
        """`faults`: fault points to arm (the worker then runs the test entry point,
        tests.support.faulty_worker, and SIGKILLs itself at the first it reaches)."""
        settings = rel_settings.model_copy(update={"worker_id": f"rel-{SESSION}-{name}"})
        process = WorkerProcess(settings, tmp_path / f"{name}.log", args=args, env=env,
                                wait_started=wait_started, faults=faults)
        started.append(process)
        return process

    yield go
    for process in started:
        process.stop()


def submit_parked(store: Store, settings: Settings, manifests: ManifestSource,
                  processor: str) -> Run:
    """A run of `processor` on a queue no worker serves: only the test executes it."""
    return submit(Submission(tenant="acme", processor=processor, version=None, input={}),
                  manifest=manifests.current(), store=store,
                  queue=RunQueue.from_url(settings.redis_url),
                  default_queue=f"parked-{SESSION}", stop_grace_seconds=1)


def in_process_executor(store: Store, manifests: ManifestSource, sandbox: Sandbox
                        ) -> Executor:
    """An executor in the test's own process, on the real database and `sandbox`."""
    return Executor(ledger=Ledger(store, Lifecycle(store)), manifests=manifests,
                    sandbox=sandbox, worker_id=f"inproc-{SESSION}")
