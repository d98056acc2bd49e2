"""Real services for integration tests: Docker, Redis, PostgreSQL and the registry.

`make test` starts them (scripts/services.sh); a missing one fails the session, it is
never skipped. Each session gets its own PostgreSQL database and RQ queue name, so
it cannot disturb a dev stack sharing the same servers.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import psycopg
import pytest
import redis
import uvicorn
import yaml

from api.app import create_app
from runner.authoring.publish import publish
from runner.client import RunnerClient
from runner.control.keys import Keys
from runner.control.migrate import upgrade
from runner.control.store import Store
from runner.domain import Role
from runner.execution.worker import sandbox_config
from runner.sandbox import MANAGED_LABEL, RUN_LABEL, WORKER_LABEL, SandboxConfig
from runner.settings import Settings, load_settings

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


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    client = docker.from_env()
    client.ping()
    return client


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"runner_test_{SESSION}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def published(docker_client: docker.DockerClient) -> dict[str, dict[str, Any]]:
    """Every sample and test processor, built on the local bases and pushed by digest."""
    entries = {}
    for path in PROCESSOR_DIRS:
        entry = publish(path, registry=REGISTRY, client=docker_client, local_base=True)
        for key, value in OVERRIDES.get(entry["name"], {}).items():
            entry[key] = {**entry.get(key, {}), **value}
        entries[entry["name"]] = entry
    return entries


def write_manifest(path: Path, entries: dict[str, dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "processors": list(entries.values())},
                                   sort_keys=False))
    return path


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory: pytest.TempPathFactory,
                  published: dict[str, dict[str, Any]]) -> Path:
    return write_manifest(tmp_path_factory.mktemp("manifest") / "manifest.yaml", published)


@pytest.fixture(scope="session")
def settings(database_url: str, manifest_path: Path) -> Settings:
    return load_settings(database_url=database_url, redis_url=REDIS_URL,
                         manifest=manifest_path, queue=f"test-{SESSION}", registry=REGISTRY,
                         stop_grace_seconds=1, worker_id=f"test-worker-{SESSION}",
                         log_format="json")


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


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    names = ("database_url", "redis_url", "manifest", "queue", "registry",
             "stop_grace_seconds", "worker_id", "lease_seconds", "heartbeat_seconds",
             "drain_timeout_seconds", "reconcile_interval_seconds", "reconcile_grace_seconds")
    values = {f"RUNNER_{n.upper()}": str(getattr(settings, n)) for n in names}
    return {**os.environ, **values, "RUNNER_LOG_FORMAT": "json", **extra}


class WorkerProcess:
    """A real `runner worker` process, its log file and its pid."""

    def __init__(self, settings: Settings, log_path: Path, *, args: list[str] | None = None,
                 env: dict[str, str] | None = None, wait_started: bool = True) -> None:
        self.log_path = log_path
        self._out = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runner", "worker", *(args or [])], cwd=ROOT,
            env={**child_env(settings), **(env or {})},
            stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while wait_started and b"worker_started" not in log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def memory_kib(self, field: str = "VmHWM") -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc status")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = 9) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        if sig == 9:
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is not None:
            self._out.close()
            return
        self.process.send_signal(18)  # SIGCONT, in case a test left it stopped
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._out.close()


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    process = WorkerProcess(settings, tmp_path_factory.mktemp("worker") / "worker.log")
    yield process
    process.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_free_port = free_port  # the older name, still imported by some callers


class ApiServer:
    """The real app under uvicorn on a loopback port, in a thread of this process."""

    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            app or create_app(settings), host="127.0.0.1", port=self.port,
            log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("API server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


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


def containers_left(client: docker.DockerClient, run_id: str, timeout: float = 20
                    ) -> list[Any]:
    """The run's containers still there after `timeout`: workers remove a finished
    container in the background, just after recording the run's end."""
    deadline = time.monotonic() + timeout
    while (left := containers_of(client, run_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="session", autouse=True)
def remove_leftover_containers() -> Iterator[None]:
    """Whatever a failed test left behind is removed at session end (by our label)."""
    yield
    for container in session_containers(docker.from_env()):
        container.remove(force=True, v=True)


def session_containers(client: docker.DockerClient) -> list[Any]:
    """Runner containers made by this test session (its workers carry SESSION in the id)."""
    return [c for c in client.containers.list(all=True, sparse=True,
                                              filters={"label": MANAGED_LABEL})
            if SESSION in (c.attrs.get("Labels") or {}).get(WORKER_LABEL, "")]


# Reliability fixtures: their own Redis server (so it can be flushed and restarted
# without touching anything else), short leases, and workers started per test.

class RedisServer:
    """A throwaway redis-server on a free loopback port, with no persistence."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


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
def rel_settings(database_url: str, rel_manifest: Path, rel_redis: RedisServer) -> Settings:
    return load_settings(database_url=database_url, redis_url=rel_redis.url,
                         manifest=rel_manifest, queue=f"rel-{SESSION}", registry=REGISTRY,
                         stop_grace_seconds=1, worker_id=f"rel-{SESSION}", log_format="json",
                         lease_seconds=3, heartbeat_seconds=0.5, drain_timeout_seconds=3,
                         reconcile_interval_seconds=1, reconcile_grace_seconds=1)


@pytest.fixture
def start_worker(rel_settings: Settings, tmp_path: Path
                 ) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes on the reliability queue; all stopped after the test."""
    started: list[WorkerProcess] = []

    def go(name: str = "w", *, args: list[str] | None = None,
           env: dict[str, str] | None = None, wait_started: bool = True) -> WorkerProcess:
        settings = rel_settings.model_copy(update={"worker_id": f"rel-{SESSION}-{name}"})
        process = WorkerProcess(settings, tmp_path / f"{name}.log", args=args, env=env,
                                wait_started=wait_started)
        started.append(process)
        return process

    yield go
    for process in started:
        process.stop()
