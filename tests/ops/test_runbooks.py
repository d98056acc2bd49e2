"""Each runbook's own commands, run against a real stack broken the way it describes.

For every runbook: induce the failure for real, run its diagnose blocks and check they
show it, run its recover blocks (the test does the `manual` steps: starting and
stopping its own processes), then its verify blocks, and check the stack works again.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from runner.control.keys import Keys
from runner.domain import ErrorCode, Role, RunStatus
from tests.integration.reliability import DockerProxy
from tests.ops.conftest import RUNBOOKS, Registry, Stack, runbook_blocks

pytestmark = pytest.mark.integration

NAMES = sorted(p.stem for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
FAST = {"initial": "100ms", "max": "200ms"}


def test_every_runbook_has_its_sections_and_blocks() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    tests = Path(__file__).read_text()
    assert len(NAMES) >= 8
    for name in NAMES:
        text = (RUNBOOKS / f"{name}.md").read_text()
        for heading in ("## Symptoms", "## Diagnose", "## Recover", "## Verify"):
            assert heading in text, f"{name}: no {heading}"
        blocks = runbook_blocks(RUNBOOKS / f"{name}.md")
        for kind in ("diagnose", "recover", "verify"):
            assert blocks[kind], f"{name}: no {kind} block"
        assert f"({name}.md)" in index, f"{name} is not in the index"
        assert f"test_{name.replace('-', '_')}" in index
        assert f"def test_{name.replace('-', '_')}(" in tests


def test_queue_backlog(stack: Stack) -> None:
    stack.write_manifest([stack.entry("echo", "echo")])
    flood = [stack.submit("echo", {"message": f"junk {i}"}, tenant="flood") for i in range(6)]
    wanted = [stack.submit("echo", {"message": "wanted"}, tenant="acme") for _ in range(2)]

    diagnosis = stack.runbook("queue-backlog", "diagnose")
    assert "queued    8" in diagnosis.output
    assert "'flood': 6" in diagnosis.output
    assert "no live worker serves their queues" in diagnosis.output

    recovery = stack.runbook("queue-backlog", "recover", TENANT="flood")
    assert recovery.returncode == 0, recovery
    assert "canceled 6 queued run(s)" in recovery.output
    stack.start_worker()  # the manual step: more workers (here: the first one)

    verified = stack.runbook("queue-backlog", "verify")
    assert verified.returncode == 0, verified
    assert {stack.run(r.id).status for r in flood} == {RunStatus.CANCELED}
    assert {stack.run(r.id).status for r in wanted} == {RunStatus.SUCCEEDED}


def _sleepy(stack: Stack) -> None:
    stack.write_manifest([stack.entry("echo", "echo"), stack.entry(
        "nap", "sleep", retry={"max_attempts": 2, "backoff": FAST, "on": ["worker_lost"]})])


def test_worker_crash(stack: Stack) -> None:
    _sleepy(stack)
    worker = stack.start_worker("w1")
    run = stack.submit("nap", {"seconds": 5})
    stack.wait(run.id, RunStatus.RUNNING, timeout=60)
    worker.kill()  # SIGKILL mid-run: nothing is handed back
    stack.wait_lease_expired(run.id)  # the 3 s lease

    diagnosis = stack.runbook("worker-crash", "diagnose")
    assert run.id in diagnosis.output and "lease expired" in diagnosis.output
    assert "alive=False" in diagnosis.output

    recovery = stack.runbook("worker-crash", "recover")
    assert recovery.returncode == 0, recovery
    assert "expired leases: 1" in recovery.output
    assert stack.run(run.id).status is RunStatus.QUEUED
    stack.start_worker("w2")  # the manual step: restart the worker

    verified = stack.runbook("worker-crash", "verify")
    assert verified.returncode == 0, verified
    final = stack.run(run.id)
    assert (final.status, final.attempt) == (RunStatus.SUCCEEDED, 2)
    assert stack.db().attempts(run.id)[0]["error_code"] == ErrorCode.WORKER_LOST


def test_runs_stuck_running(stack: Stack) -> None:
    _sleepy(stack)
    worker = stack.start_worker("frozen")
    run = stack.submit("nap", {"seconds": 5})
    stack.wait(run.id, RunStatus.RUNNING, timeout=60)
    time.sleep(0.5)
    worker.signal(signal.SIGSTOP)  # frozen: alive, holds its run, renews nothing
    stack.wait_lease_expired(run.id)

    diagnosis = stack.runbook("runs-stuck-running", "diagnose")
    assert run.id in diagnosis.output and "lease expired" in diagnosis.output
    assert "alive=stopped" in diagnosis.output

    recovery = stack.runbook("runs-stuck-running", "recover", RUN_ID=run.id)
    assert recovery.returncode == 0, recovery
    assert "expired leases: 1" in recovery.output
    assert "no stuck runs" in recovery.output
    worker.kill()  # the manual steps: kill the frozen worker, start a fresh one
    stack.start_worker("fresh")

    verified = stack.runbook("runs-stuck-running", "verify")
    assert verified.returncode == 0, verified
    final = stack.run(run.id)
    assert (final.status, final.attempt) == (RunStatus.SUCCEEDED, 2)


def test_dead_letter_spike(stack: Stack) -> None:
    stack.write_manifest([stack.entry(
        "flaky", "exit", retry={"max_attempts": 2, "backoff": FAST, "on": ["exit:75"]},
        input_schema={"type": "object"})])
    stack.start_worker()
    runs = [stack.submit("flaky", {"code": 75}) for _ in range(3)]
    for run in runs:
        assert stack.wait(run.id).status is RunStatus.DEAD_LETTER

    diagnosis = stack.runbook("dead-letter-spike", "diagnose")
    assert "3 dead letter(s)" in diagnosis.output
    assert re.search(r"flaky\s+nonzero_exit\s+x3", diagnosis.output), diagnosis

    # The fix: a new release of the processor (here the echo image, which succeeds).
    inputs = {"PROCESSOR": "flaky", "VERSION": "1.0.0", "FIXED_IMAGE": stack.images["echo"]}
    recovery = stack.runbook("dead-letter-spike", "recover", **inputs)
    assert recovery.returncode == 0, recovery
    assert "3 replayed, 0 refused" in recovery.output

    verified = stack.runbook("dead-letter-spike", "verify", **inputs)
    assert verified.returncode == 0, verified
    assert "0 dead letter(s)" in verified.output
    for run in runs:
        assert stack.run(run.id).status is RunStatus.DEAD_LETTER  # the record stays


def test_image_not_allowed(stack: Stack) -> None:
    stack.write_manifest([stack.entry("greet", "echo")])
    api = stack.start_api()
    queued = [stack.submit("greet", {"message": "hi"}) for _ in range(2)]
    # A release re-pins greet while its runs wait: they were queued with the old image.
    stack.write_manifest([stack.entry("greet", "exit")])
    stack.start_worker()
    for run in queued:
        final = stack.wait(run.id)
        assert (final.status, final.error_code) == (RunStatus.DEAD_LETTER,
                                                     ErrorCode.IMAGE_NOT_ALLOWED)
    refused = httpx.post(f"{stack.env['RUNNER_API_URL']}/v1/runs", json={
        "processor": "newproc", "input": {}},
        headers={"Authorization": f"Bearer {stack.env['RUNNER_API_KEY']}"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_processor"

    inputs = {"PROCESSOR": "newproc", "VERSION": "1.0.0", "IMAGE": stack.images["echo"]}
    diagnosis = stack.runbook("image-not-allowed", "diagnose", **inputs)
    assert "2 dead letter(s)" in diagnosis.output and "image_not_allowed" in diagnosis.output
    assert "newproc is not in the manifest" in diagnosis.output
    assert "greet 1.0.0" in diagnosis.output  # what the API allows

    recovery = stack.runbook("image-not-allowed", "recover", **inputs)
    assert recovery.returncode == 0, recovery
    assert "2 replayed, 0 refused" in recovery.output

    verified = stack.runbook("image-not-allowed", "verify", **inputs)
    assert verified.returncode == 0, verified
    assert "0 dead letter(s)" in verified.output
    assert api.alive()


def test_bad_manifest(stack: Stack) -> None:
    good = [stack.entry("echo", "echo")]
    stack.write_manifest(good)
    api = stack.start_api()
    stack.start_worker()
    # Deployed by copying over the file: a new processor pinned by tag, a typo'd limit.
    new = stack.entry("newproc", "echo")
    broken = {**new, "image": "127.0.0.1:5000/processors/echo:1.0.0", "limits": {"cpu": 1}}
    bad = stack.write_manifest([*good, broken], stack.directory / "bad.yaml")
    stack.manifest.write_bytes(bad.read_bytes())
    with httpx.Client(base_url=stack.env["RUNNER_API_URL"], headers={
            "Authorization": f"Bearer {stack.env['RUNNER_API_KEY']}"}) as client:
        refused = client.post("/v1/runs", json={"processor": "newproc", "input": {}})
        assert refused.json()["error"]["code"] == "unknown_processor"
        still = client.post("/v1/runs", json={"processor": "echo", "input": {}})
        assert still.status_code == 202  # the last good manifest stays in force
    assert "manifest_reload_refused" in api.log()

    diagnosis = stack.runbook("bad-manifest", "diagnose")
    assert re.search(r"manifest\.yaml:\d+: processors\[1\]\.image: .*pinned by tag",
                     diagnosis.output), diagnosis
    assert "cpu" in diagnosis.output and "INVALID" in diagnosis.output

    fixed = stack.write_manifest([*good, new], stack.directory / "fixed.yaml")
    recovery = stack.runbook("bad-manifest", "recover", FIXED_MANIFEST=str(fixed))
    assert recovery.returncode == 0, recovery

    verified = stack.runbook("bad-manifest", "verify")
    assert verified.returncode == 0, verified
    assert stack.wait(stack.submit("newproc", {"message": "now"}).id).status is (
        RunStatus.SUCCEEDED)


def _push_to(client: docker.DockerClient, source: str, repository: str) -> str:
    """Copy a local image into another registry; its pinned reference there."""
    client.images.get(source).tag(repository, "1")
    for event in client.api.push(repository, tag="1", stream=True, decode=True):
        assert "error" not in event, event
    refs = client.images.get(f"{repository}:1").attrs["RepoDigests"]
    return next(r for r in refs if r.startswith(repository + "@"))


def test_registry_down(stack: Stack, docker_client: docker.DockerClient) -> None:
    registry = Registry(stack.directory / "registry")
    repository = f"{registry.address}/processors/regecho"
    try:
        pinned = _push_to(docker_client, stack.images["echo"], repository)
        for ref in (f"{repository}:1", pinned):  # not on this engine: must be pulled
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(ref)
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(pinned)
        stack.write_manifest([{"name": "regecho", "version": "1.0.0", "image": pinned}])
        registry.stop()
        stack.start_worker()
        run = stack.submit("regecho", {"message": "pull me"})
        final = stack.wait(run.id)
        assert (final.status, final.error_code) == (RunStatus.DEAD_LETTER,
                                                     ErrorCode.IMAGE_PULL_FAILED)

        diagnosis = stack.runbook("registry-down", "diagnose")
        assert "local=NO" in diagnosis.output and "unreachable" in diagnosis.output
        assert "image_pull_failed" in diagnosis.output

        registry.start()  # the manual step
        recovery = stack.runbook("registry-down", "recover")
        assert recovery.returncode == 0, recovery
        assert "pulled" in recovery.output and "1 replayed, 0 refused" in recovery.output

        verified = stack.runbook("registry-down", "verify")
        assert verified.returncode == 0, verified
        assert "local=yes" in verified.output and "0 dead letter(s)" in verified.output
    finally:
        registry.stop()
        for image in docker_client.images.list(name=repository):
            for ref in image.tags + image.attrs.get("RepoDigests", []):
                if ref.startswith(repository):
                    with contextlib.suppress(docker.errors.ImageNotFound):
                        docker_client.images.remove(ref)


def test_docker_down(stack: Stack) -> None:
    proxy = DockerProxy()
    proxy.up()
    try:
        stack.env["DOCKER_HOST"] = proxy.url  # the workers' and the operator's engine
        stack.write_manifest([stack.entry("echo", "echo")])
        stack.start_worker()
        proxy.down()  # the engine goes away under a running worker
        runs = [stack.submit("echo", {"message": f"{i}"}) for i in range(2)]
        for run in runs:
            final = stack.wait(run.id)
            assert (final.status, final.error_code) == (RunStatus.DEAD_LETTER,
                                                         ErrorCode.DOCKER_UNAVAILABLE)

        diagnosis = stack.runbook("docker-down", "diagnose")
        assert "PROBLEM   docker unreachable" in diagnosis.output
        assert "cannot reach" in diagnosis.output
        assert re.search(r"echo\s+docker_unavailable\s+x2", diagnosis.output), diagnosis

        proxy.up()  # the manual step: start the engine
        recovery = stack.runbook("docker-down", "recover")
        assert recovery.returncode == 0, recovery
        assert "2 replayed, 0 refused" in recovery.output

        verified = stack.runbook("docker-down", "verify")
        assert verified.returncode == 0, verified
        assert "0 dead letter(s)" in verified.output
    finally:
        proxy.down()


def test_disk_full(stack: Stack, docker_client: docker.DockerClient) -> None:
    # Our own image prefix, so pruning can only ever touch references this test made.
    stack.env["RUNNER_REGISTRY"] = f"127.0.0.1:5000/{stack.name}"
    old = f"{stack.env['RUNNER_REGISTRY']}/processors/flood"
    docker_client.images.get(stack.images["exit"]).tag(old, "0.9.0")  # a retired pin
    try:
        stack.write_manifest([stack.entry("flood", "logflood",
                                          limits={"log_bytes": "64Ki", "timeout": "60s"})])
        stack.start_worker()
        runs = [stack.submit("flood", {"megabytes": 1}) for _ in range(2)]
        for run in runs:
            final = stack.wait(run.id)
            assert final.status is RunStatus.SUCCEEDED and final.log_truncated

        diagnosis = stack.runbook("disk-full", "diagnose")
        assert re.search(r"flood\s+\d{5,} bytes", diagnosis.output), diagnosis
        assert "truncated (24h)   flood: 2 run(s)" in diagnosis.output
        assert f"{old}:0.9.0" in diagnosis.output

        recovery = stack.runbook("disk-full", "recover", KEEP="0s")
        assert recovery.returncode == 0, recovery
        assert f"removed {old}:0.9.0" in recovery.output

        verified = stack.runbook("disk-full", "verify")
        assert verified.returncode == 0, verified
        assert "stored run logs   0 bytes" in verified.output
        assert "unpinned images   0 reference(s)" in verified.output
        assert docker_client.images.list(name=old) == []
        assert stack.wait(stack.submit("flood", {"megabytes": 1}).id).status is (
            RunStatus.SUCCEEDED)
    finally:
        for image in docker_client.images.list(name=old):
            for tag in image.tags:
                if tag.startswith(old):
                    docker_client.images.remove(tag)


def test_redis_data_loss(stack: Stack) -> None:
    stack.write_manifest([stack.entry("echo", "echo")])
    stack.start_api()
    stack.redis.stop()
    with httpx.Client(base_url=stack.env["RUNNER_API_URL"], headers={
            "Authorization": f"Bearer {stack.env['RUNNER_API_KEY']}"}) as client:
        accepted = [client.post("/v1/runs", json={"processor": "echo", "input": {}})
                    for _ in range(3)]
    assert [a.status_code for a in accepted] == [202] * 3  # recorded, enqueue deferred

    down = stack.runbook("redis-data-loss", "diagnose")
    assert "PROBLEM   redis unreachable" in down.output
    assert "NOT READY" in down.output  # the API's /readyz

    stack.redis.start()  # back, and empty: it had no persistence
    time.sleep(1.5)  # past RUNNER_RECONCILE_GRACE_SECONDS
    empty = stack.runbook("redis-data-loss", "diagnose")
    assert "missing   3 queued run(s) due but not in Redis" in empty.output

    recovery = stack.runbook("redis-data-loss", "recover")
    assert recovery.returncode == 0, recovery
    assert "requeued: 3" in recovery.output
    stack.start_worker()  # workers had stopped with the host

    verified = stack.runbook("redis-data-loss", "verify")
    assert verified.returncode == 0, verified
    for answer in accepted:
        assert stack.run(answer.json()["id"]).status is RunStatus.SUCCEEDED


def test_api_key_rotation(stack: Stack) -> None:
    stack.start_api()
    old = stack.key("acme", Role.SUBMITTER)
    old_id = old.split("_")[1]
    url = stack.env["RUNNER_API_URL"]

    def answer(key: str) -> int:
        return httpx.get(f"{url}/v1/runs", headers={"Authorization": f"Bearer {key}"}
                         ).status_code

    assert answer(old) == 200
    inputs = {"TENANT": "acme", "ROLE": "submitter", "OLD_KEY_ID": f"rk_{old_id}_"}
    diagnosis = stack.runbook("api-key-rotation", "diagnose", **inputs)
    assert f"rk_{old_id}_" in diagnosis.output and "active" in diagnosis.output

    recovery = stack.runbook("api-key-rotation", "recover", **inputs)
    assert recovery.returncode == 0, recovery
    new = (stack.directory / "acme.key").read_text().strip()

    verified = stack.runbook("api-key-rotation", "verify", **inputs)
    assert verified.returncode == 0, verified
    assert re.search(rf"rk_{old_id}_\.\.\.\s+acme\s+submitter\s+revoked", verified.output)
    assert answer(old) == 401 and answer(new) == 200
    keys: list[dict[str, Any]] = Keys(stack.db()).list(tenant="acme")
    assert [k["revoked_at"] is not None for k in keys] == [True, False]

