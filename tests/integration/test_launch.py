"""Launch-time checks in one process: allowlist re-check and pull by digest."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import docker
import pytest

from runner.authoring.publish import publish
from runner.control.store import Store
from runner.domain import ErrorCode, RunStatus
from runner.errors import DockerUnavailableError
from runner.execution.wiring import sandbox_config
from runner.manifest import ManifestSource
from runner.sandbox import RUN_LABEL, ContainerSpec, Sandbox
from runner.settings import Settings
from tests.integration.conftest import (
    REGISTRY,
    SESSION,
    bare_sandbox_config,
    in_process_executor,
    submit_parked,
    write_manifest,
)


def test_repinned_manifest_makes_the_worker_refuse(
        tmp_path: Path, settings: Settings, store: Store,
        published: dict[str, dict[str, Any]], docker_client: docker.DockerClient) -> None:
    path = write_manifest(tmp_path / "manifest.yaml", dict(published))
    manifests = ManifestSource(path)
    run = submit_parked(store, settings, manifests, "echo")
    since = int(time.time()) - 1

    # An operator re-pins echo to another digest after the submission.
    repinned = dict(published)
    repinned["echo"] = {**published["echo"], "image": published["exit"]["image"]}
    write_manifest(path, repinned)

    executor = in_process_executor(store, manifests, Sandbox.from_env(sandbox_config(settings)))
    assert executor.execute(run.id, 1) is RunStatus.DEAD_LETTER
    final = store.get_run(run.id)
    assert final is not None
    assert (final.status, final.error_code) == (RunStatus.DEAD_LETTER,
                                                ErrorCode.IMAGE_NOT_ALLOWED)
    assert "no longer allowlisted" in (final.error_message or "")
    assert final.error_stage == "launch"
    # Nothing was started: no container event at all carries this run's label.
    events = list(docker_client.events(since=since, until=int(time.time()) + 1, decode=True,
                                       filters={"label": f"{RUN_LABEL}={run.id}"}))
    assert events == []
    assert store.attempts(run.id)[0]["container_id"] is None
    # A second execution of the same run cannot claim it again.
    assert executor.execute(run.id, 1) is None
    assert executor.execute(run.id, 2) is None


def test_first_run_of_a_missing_image_pulls_it_by_digest(
        tmp_path: Path, settings: Settings, docker_client: docker.DockerClient) -> None:
    source = tmp_path / "pullprobe"
    source.mkdir()
    (source / "processor.yaml").write_text(
        f'name: pullprobe-{SESSION}\nversion: "1"\ntemplate: shell\n')
    (source / "main.sh").write_text(f'echo "pulled {SESSION}"\n')
    entry = publish(source, registry=REGISTRY, client=docker_client, local_base=True)
    image = entry["image"]
    docker_client.images.remove(docker_client.api.inspect_image(image)["Id"], force=True)
    assert not docker_client.images.list(name=image.split("@")[0])

    sandbox = Sandbox.from_env(bare_sandbox_config(settings))
    logs = bytearray()
    spec = ContainerSpec(name=f"runner-pullprobe-{SESSION}", image=image, cpus=0.2,
                         memory_bytes=32 * 1024**2, pids_limit=8, timeout_seconds=30,
                         log_cap_bytes=4096, input_json=json.dumps({}).encode(),
                         labels={"io.container-runner.worker-id": f"inproc-{SESSION}"})
    repo = image.split("@")[0]

    def pulls(since: float) -> list[dict[str, Any]]:
        """The engine's own record of pulls of this image since `since` (a log line
        would do, but structlog's capture misses loggers cached by an earlier
        configure_logging in this process)."""
        return [e for e in docker_client.events(
            since=int(since), until=int(time.time()) + 1, decode=True,
            filters={"type": "image", "event": "pull"})
            if str(e.get("id", "")).startswith(repo)]

    before = time.time() - 1
    outcome = sandbox.run(spec, on_log=logs.extend)
    assert pulls(before), "the missing image was not pulled"
    assert outcome.exit_code == 0
    assert bytes(logs) == f"pulled {SESSION}\n".encode()
    assert image in docker_client.api.inspect_image(image)["RepoDigests"]
    # Now local: a second run does not pull again.
    sandbox.run(spec, on_log=logs.extend)
    assert len(pulls(before)) == 1
    docker_client.images.remove(docker_client.api.inspect_image(image)["Id"], force=True)


def test_unreachable_engine_is_docker_unavailable(settings: Settings,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # An engine that goes away after the worker connected...
    gone = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
    sandbox = Sandbox(gone, sandbox_config(settings))
    with pytest.raises(DockerUnavailableError) as caught:
        sandbox.ensure_image("127.0.0.1:5000/processors/echo@sha256:" + "0" * 64)
    assert caught.value.error_code == ErrorCode.DOCKER_UNAVAILABLE
    # ...and one that is not there when the worker starts.
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(DockerUnavailableError):
        Sandbox.from_env(sandbox_config(settings))
