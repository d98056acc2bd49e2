"""A whole, isolated, breakable stack per runbook test.

Each `stack` has its own Redis server, its own PostgreSQL database on the shared
server, its own queue, its own deployment name on the Docker engine, and (when asked)
its own `runner api` and `runner worker` processes and its own registry. Everything it
started is stopped, and every container labelled with its deployment name removed, at
the end of the test, so a runbook may break any of it for real.

Runbook commands are read from the markdown (see runbooks/README.md) and run with bash
in the stack's environment, exactly as an operator would paste them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from runner.authoring.publish import publish
from runner.control.keys import Keys
from runner.control.queue import RunQueue
from runner.control.runs import Submission, submit
from runner.control.store import Store
from runner.domain import Role, Run, RunStatus, utcnow
from runner.manifest import load_manifest
from runner.manifest.yamlio import dump_manifest
from runner.sandbox import INSTANCE_LABEL
from tests.support.net import free_port, http_status
from tests.support.processes import RunnerProcess, start_api_process, start_worker_process
from tests.support.services import RedisServer, scratch_database
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "runbooks"
VENV_BIN = ROOT / "var" / "venv" / "bin"
PG_URL = os.environ.get("RUNNER_TEST_PG_URL", "postgresql://runner:runner@127.0.0.1:5439/runner")
REGISTRY = os.environ.get("RUNNER_TEST_REGISTRY", "127.0.0.1:5000")
SESSION = secrets.token_hex(3)
SAMPLES = ROOT / "processor-templates" / "samples"
_numbers = itertools.count(1)

BLOCK = re.compile(r"<!--\s*(diagnose|recover|verify|manual)\s*-->\s*\n```sh\n(.*?)```", re.S)


def runbook_blocks(path: Path) -> dict[str, list[str]]:
    """The runbook's shell blocks by marker: diagnose, recover, verify, manual."""
    blocks: dict[str, list[str]] = {"diagnose": [], "recover": [], "verify": [], "manual": []}
    for kind, body in BLOCK.findall(path.read_text()):
        blocks[kind].append(body)
    return blocks


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> dict[str, str]:
    """The sample processors' pinned references (built on the local bases, pushed)."""
    return {name: publish(SAMPLES / name, registry=REGISTRY, client=docker_client,
                          local_base=True)["image"]
            for name in ("echo", "sleep", "exit", "logflood")}


class Registry:
    """Debian's docker-registry on a free loopback port, its storage under the test."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "registry.yml"
        self.config.write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(directory / "data")}},
            "http": {"addr": self.address}}))
        self.log_path = directory / "registry.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                          stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: (http_status(f"http://{self.address}/v2/") or 500) < 500,
                   timeout=60, interval=0.2, message="the registry never answered")

    def stop(self) -> None:
        if self.popen is not None:
            self.popen.terminate()
            self.popen.wait(10)
            self.popen = None


@dataclass
class BlockResult:
    kind: str
    returncode: int
    output: str

    def __str__(self) -> str:
        return f"[{self.kind} exit {self.returncode}]\n{self.output}"


@dataclass
class Stack:
    """One isolated deployment: env, processes, and helpers to break and inspect it."""

    directory: Path
    redis: RedisServer
    database_url: str
    name: str
    images: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    processes: list[RunnerProcess] = field(default_factory=list)
    store: Store | None = None

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.yaml"

    def write_manifest(self, entries: list[dict[str, Any]], path: Path | None = None) -> Path:
        target = path or self.manifest
        target.write_text(dump_manifest({"version": 1, "processors": entries}))
        return target

    def entry(self, name: str, image_of: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "version": "1.0.0", "image": self.images[image_of], **extra}

    def db(self) -> Store:
        if self.store is None:
            self.store = Store(self.env["RUNNER_DATABASE_URL"])
        return self.store

    # Processes -----------------------------------------------------------------

    def start_worker(self, name: str = "w1", env: dict[str, str] | None = None
                     ) -> RunnerProcess:
        process = start_worker_process(
            {**self.env, "RUNNER_WORKER_ID": f"{self.name}-{name}", **(env or {})},
            self.directory / f"{name}.log", name=name, append=True, timeout=90)
        self.processes.append(process)
        return process

    def start_api(self) -> RunnerProcess:
        process = start_api_process(self.env, self.directory / "api.log", append=True,
                                    timeout=90)
        self.processes.append(process)
        self.env["RUNNER_API_URL"] = str(process.url)
        self.env["RUNNER_API_KEY"] = self.key("ops", Role.ADMIN)
        return process

    def key(self, tenant: str, role: Role) -> str:
        return Keys(self.db()).create(tenant=tenant, role=role)[1]

    # Runs ----------------------------------------------------------------------

    def submit(self, processor: str, input: dict[str, Any] | None = None,
               tenant: str = "acme") -> Run:
        """Straight into the database and the queue, as the API does."""
        queue = RunQueue.from_url(self.env["RUNNER_REDIS_URL"])
        try:
            return submit(Submission(tenant=tenant, processor=processor, version=None,
                                     input=input or {}),
                          manifest=load_manifest(self.manifest), store=self.db(), queue=queue,
                          default_queue=self.env["RUNNER_QUEUE"], stop_grace_seconds=1)
        finally:
            queue.redis.close()

    def run(self, run_id: str) -> Run:
        run = self.db().get_run(run_id)
        assert run is not None
        return run

    def wait(self, run_id: str, *statuses: RunStatus, timeout: float = 120) -> Run:
        """The run once it is in one of `statuses` (default: any final status)."""
        wanted = statuses or tuple(s for s in RunStatus if s.terminal)
        seen: list[Run] = []

        def reached() -> Run | None:
            seen[:] = [self.run(run_id)]
            return seen[0] if seen[0].status in wanted else None

        return wait_until(reached, timeout=timeout, interval=0.2, message=lambda: (
            f"run {run_id} is {seen[-1].status} (attempt {seen[-1].attempt}), "
            f"wanted {[s.value for s in wanted]}"))

    def wait_lease_expired(self, run_id: str, timeout: float = 60) -> None:
        """Until the run's lease is in the past (what `runner ops` calls expired)."""
        def expired() -> bool:
            lease = self.run(run_id).lease_expires_at
            return lease is None or lease < utcnow()

        wait_until(expired, timeout=timeout, interval=0.2,
                   message=f"the lease of run {run_id} never expired")

    # Runbooks ------------------------------------------------------------------

    def runbook(self, name: str, kind: str, **inputs: str) -> BlockResult:
        """Run every `kind` block of runbooks/NAME.md, in order, as one bash script.

        Diagnose blocks run to the end whatever each command returns (a diagnosis is
        expected to find problems); recover and verify blocks stop at the first failure.
        """
        blocks = runbook_blocks(RUNBOOKS / f"{name}.md")[kind]
        assert blocks, f"runbooks/{name}.md has no {kind} block"
        strict = "set -eo pipefail\n" if kind in ("recover", "verify") else ""
        env = {**self.env, **inputs}
        done = subprocess.run(["bash", "-c", strict + "\n".join(blocks)], cwd=self.directory,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=300, check=False)
        result = BlockResult(kind, done.returncode, done.stdout.decode(errors="replace"))
        with (self.directory / "runbook.log").open("a") as out:
            out.write(f"== {name} {kind}\n{result}\n")
        print(f"== {name} {kind}\n{result}")  # shown by pytest when a test fails
        return result

    def close(self, client: docker.DockerClient) -> None:
        for process in self.processes:
            process.stop()
        if self.store is not None:
            self.store.close()
        for container in client.containers.list(
                all=True, sparse=True, filters={"label": f"{INSTANCE_LABEL}={self.name}"}):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True, v=True)
        self.redis.stop()


@pytest.fixture
def stack(tmp_path: Path, images: dict[str, str], docker_client: docker.DockerClient
          ) -> Iterator[Stack]:
    name = f"ops-{SESSION}-{next(_numbers)}"
    with scratch_database(PG_URL, name.replace("-", "_")) as database_url:
        (tmp_path / "redis").mkdir()
        made = Stack(directory=tmp_path, redis=RedisServer(tmp_path / "redis"),
                     database_url=database_url, name=name, images=images)
        try:
            made.write_manifest([made.entry("echo", "echo")])
            made.env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")},
                "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                "RUNNER_DATABASE_URL": database_url, "RUNNER_REDIS_URL": made.redis.url,
                "RUNNER_MANIFEST": str(made.manifest), "RUNNER_QUEUE": name,
                "RUNNER_REGISTRY": REGISTRY, "RUNNER_INSTANCE_NAME": name,
                "RUNNER_LOG_FORMAT": "json", "RUNNER_LEASE_SECONDS": "5",
                "RUNNER_HEARTBEAT_SECONDS": "0.5", "RUNNER_STOP_GRACE_SECONDS": "1",
                "RUNNER_DRAIN_TIMEOUT_SECONDS": "3", "RUNNER_RECONCILE_INTERVAL_SECONDS": "1",
                "RUNNER_RECONCILE_GRACE_SECONDS": "1",
            }
            yield made
        finally:
            made.close(docker_client)
