"""The docker-compose deployment end to end, with real docker-compose and no mocks.

One stack under a project name of its own (so nothing clashes with another stack on the
engine): build the local images (skipped when present), `up -d`, wait until every
long-running service is healthy and the migration step has exited 0, publish the echo
sample to the stack's registry and pin it in the manifest the running stack reads,
create a key inside the api container, submit a run over HTTP to the published API
port and check its result and logs. Teardown is `down -v`, then no container of the
project (nor a processor container of its deployment) may be left.

Times on this machine (2 cores, shared): cold (no compose images, no wheelhouse) 3 min
44 s; warm 45 s. docs/compose.md describes the stack.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.net import free_port
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "var" / "venv" / "bin" / "runner"
ECHO = ROOT / "processor-templates" / "samples" / "echo"
PROJECT = f"rcmptest{secrets.token_hex(4)}"
SERVICES = ("redis", "postgres", "registry", "api", "worker")
INSTANCE_LABEL = "io.container-runner.instance"

pytestmark = pytest.mark.timeout(2400)


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
    return result


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    api_url: str
    registry: str
    manifest: Path

    def compose(self, *args: str, timeout: float = 300,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"),
                    "-p", self.project, *args], env=self.env, timeout=timeout, check=check)

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """`docker inspect` of the project's containers (of one service if named)."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = run(["docker", "ps", "-aq", *filters]).stdout.split()
        if not ids:
            return []
        inspected: list[dict[str, Any]] = json.loads(run(["docker", "inspect", *ids]).stdout)
        return inspected

    def healthy(self) -> bool:
        states = {}
        for service in SERVICES:
            found = self.containers(service)
            health = found[0]["State"].get("Health", {}).get("Status") if found else None
            states[service] = health
        migrate = self.containers("migrate")
        if migrate and migrate[0]["State"]["Status"] == "exited":
            assert migrate[0]["State"]["ExitCode"] == 0, self.compose("logs", "migrate").stdout
        return all(s == "healthy" for s in states.values()) and bool(migrate) and \
            migrate[0]["State"]["Status"] == "exited"


def leftovers(project: str) -> list[str]:
    """Containers of the compose project or of its deployment (processor containers)."""
    found = []
    for label in (f"com.docker.compose.project={project}", f"{INSTANCE_LABEL}={project}"):
        found += run(["docker", "ps", "-aq", "--filter", f"label={label}"]).stdout.split()
    return found


def remove_processor_images(registry: str) -> None:
    """Forget our echo image's tag and digest references on the host engine."""
    listed = run(["docker", "images", "--digests", "--format",
                  "{{.Repository}} {{.Tag}} {{.Digest}}", f"{registry}/processors/echo"])
    refs = set()
    for line in listed.stdout.splitlines():
        repo, tag, digest = line.split()
        if tag != "<none>":
            refs.add(f"{repo}:{tag}")
        if digest != "<none>":
            refs.add(f"{repo}@{digest}")
    if refs:
        run(["docker", "rmi", *sorted(refs)], check=False)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    run(["bash", "deploy/build-local-images.sh"], timeout=1800)
    workdir = ROOT / "var" / "compose" / PROJECT
    manifests = workdir / "manifests"
    manifests.mkdir(parents=True)
    # The app containers run as uid 10001 and read the manifest through a bind mount.
    for path in (workdir, manifests):
        path.chmod(0o755)
    manifest = manifests / "manifest.yaml"
    manifest.write_text("version: 1\nprocessors: []\n")
    manifest.chmod(0o644)
    api_port, registry_port = free_port(), free_port()
    env = {**os.environ,
           "RUNNER_COMPOSE_MANIFESTS": str(manifests),
           "RUNNER_COMPOSE_MANIFEST_FILE": manifest.name,
           "RUNNER_COMPOSE_API_PORT": str(api_port),
           "RUNNER_COMPOSE_REGISTRY_PORT": str(registry_port),
           "RUNNER_INSTANCE_NAME": PROJECT,
           "RUNNER_WORKER_CONCURRENCY": "1"}
    stack = Stack(project=PROJECT, env=env, api_url=f"http://127.0.0.1:{api_port}",
                  registry=f"127.0.0.1:{registry_port}", manifest=manifest)
    try:
        stack.compose("build", "--force-rm", "migrate", timeout=1200)  # no failed-step leftovers
        stack.compose("up", "-d", timeout=600)
        wait_until(stack.healthy, timeout=300, interval=2.0,
                   message="not every service healthy, or the migration not done")
        yield stack
    finally:
        log = ROOT / "var" / "log" / f"compose-{PROJECT}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(stack.compose("logs", "--no-color", "--timestamps", check=False).stdout)
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "30", check=False)
        remove_processor_images(stack.registry)
        shutil.rmtree(workdir, ignore_errors=True)
        left = leftovers(PROJECT)
        assert not left, f"containers left behind by {PROJECT}: {left}"
        volumes = run(["docker", "volume", "ls", "-q", "--filter",
                       f"label=com.docker.compose.project={PROJECT}"]).stdout.split()
        assert not volumes, f"volumes left behind by {PROJECT}: {volumes}"


def test_compose_stack_runs_a_published_processor(stack: Stack) -> None:
    http = httpx.Client(base_url=stack.api_url, timeout=10)

    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "manifest": "ok",
                                      "schema": "ok"}

    # Hardening that docs/compose.md promises: loopback-only ports, unprivileged app.
    for container in stack.containers():
        for bindings in (container["HostConfig"]["PortBindings"] or {}).values():
            assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, container["Name"]
    for service in ("api", "worker"):
        (container,) = stack.containers(service)
        top = run(["docker", "top", container["Id"], "-o", "pid,uid,args"]).stdout
        processes = top.splitlines()[1:]
        assert processes and all(p.split()[1] == "10001" for p in processes), (service, top)

    # Publish the echo sample into the stack's registry (from the host, as an operator
    # would) and pin it in the manifest the running stack reads.
    published = run([str(RUNNER), "processor", "publish", str(ECHO), "--local-base",
                     "--pin", str(stack.manifest)],
                    env={**os.environ, "RUNNER_REGISTRY": stack.registry}, timeout=600)
    image = next(line.split("image:", 1)[1].strip() for line in published.stdout.splitlines()
                 if "image:" in line)
    assert image.startswith(f"{stack.registry}/processors/echo@sha256:")
    # Forget the image on the host engine, so the worker's engine must pull it back from
    # the compose registry through the published loopback port. The same build may be
    # tagged for another registry on this engine (the integration suite publishes the
    # same echo), and an image still present under its id needs no pull: remove the
    # image itself, not just this registry's names for it.
    image_id = run(["docker", "image", "inspect", "--format", "{{.Id}}", image]).stdout.strip()
    remove_processor_images(stack.registry)
    run(["docker", "image", "rm", "--force", image_id], check=False)
    assert run(["docker", "image", "inspect", image], check=False).returncode != 0
    assert run(["docker", "image", "inspect", image_id], check=False).returncode != 0

    created = stack.compose("exec", "-T", "api", "runner", "keys", "create",
                            "--tenant", "compose-test")
    key = next(line for line in created.stdout.split() if line.startswith("rk_"))
    http.headers["Authorization"] = f"Bearer {key}"

    # The running API and worker reload the edited manifest; no restart.
    wait_until(lambda: any(p["name"] == "echo" for p in _processors(http)), timeout=30,
               interval=0.5, message="the API never listed the newly pinned echo processor")

    message = f"hello from {stack.project}"
    submitted = http.post("/v1/runs", json={"processor": "echo", "version": "1.0.0",
                                            "input": {"message": message}})
    assert submitted.status_code == 202, submitted.text
    run_id = submitted.json()["id"]

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get(f"/v1/runs/{run_id}").json()
        return body if body["status"] not in ("queued", "running") else None

    final = wait_until(finished, timeout=180, interval=0.5,
                       message=f"run {run_id} never finished")
    assert final["status"] == "succeeded", final
    assert final["result"] == {"echo": {"message": message}}
    assert final["exit_code"] == 0
    assert final["image"] == image
    assert final["attempt"] == 1

    logs = http.get(f"/v1/runs/{run_id}/logs")
    assert logs.status_code == 200, logs.text
    assert f"echo run={run_id} attempt=1" in logs.text
    assert f"message={message}" in logs.text

    # The host engine now has the image, pulled by digest from the compose registry.
    assert run(["docker", "image", "inspect", image], check=False).returncode == 0

    assert http.get("/readyz").status_code == 200
    assert stack.healthy()


def _processors(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.get("/v1/processors")
    assert response.status_code == 200, response.text
    body = response.json()
    items: list[dict[str, Any]] = body["items"] if isinstance(body, dict) else body
    return items
