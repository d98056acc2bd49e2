"""Provenance receipts: what each attempt asked of the engine and what the engine
reports it applied; a container whose settings differ is refused before it starts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import docker
import pytest

from runner.client import RunnerClient
from runner.control.store import Store
from runner.domain import ErrorCode, RunStatus
from runner.errors import SandboxMismatchError
from runner.execution.wiring import sandbox_config
from runner.manifest import ManifestSource, load_manifest
from runner.sandbox import RUN_LABEL, ContainerSpec, Sandbox
from runner.settings import Settings
from tests.integration.conftest import (
    SESSION,
    WorkerProcess,
    bare_sandbox_config,
    in_process_executor,
    submit_parked,
    write_manifest,
)


class DroppingSandbox(Sandbox):
    """Stands in for an engine (or a plugin) that silently ignores some settings: the
    pids limit is not applied, and the host's Docker socket is bind-mounted."""

    def _host_config(self, spec: ContainerSpec) -> dict[str, Any]:
        config = super()._host_config(spec)
        config.pop("PidsLimit", None)
        config["Binds"] = ["/var/run/docker.sock:/var/run/docker.sock:ro"]
        return config


def test_a_run_shows_the_receipt_of_what_the_engine_applied(
        client: RunnerClient, worker: WorkerProcess, settings: Settings,
        published: dict[str, dict[str, Any]]) -> None:
    run = client.wait(client.submit("echo", {"message": "hi"})["id"], timeout=120)
    assert run["status"] == "succeeded"
    shown = client.run(run["id"])
    receipt = shown["provenance"]
    entry = load_manifest(settings.manifest).find("echo", None)
    assert entry is not None
    assert receipt["pinned"] == shown["image"] == entry.image
    assert receipt["image_id"] == shown["attempts"][-1]["image_id"]
    assert receipt["image_id"].startswith("sha256:")
    assert receipt["manifest_revision"] == shown["manifest_revision"]
    assert receipt["mismatches"] == []
    applied = receipt["applied"]
    assert applied["pids_limit"] == entry.limits.pids
    assert applied["memory_bytes"] == applied["memory_swap_bytes"] == entry.limits.memory_bytes
    assert applied["cpus"] == pytest.approx(entry.limits.cpus)
    assert (applied["network_mode"], applied["read_only_rootfs"], applied["privileged"],
            applied["cap_drop"], applied["security_opt"], applied["user"]) == (
        "none", True, False, ["ALL"], ["no-new-privileges"], settings.container_user)
    assert applied["binds"] == [] and applied["mounts"] == [{"type": "volume",
                                                             "target": "/run"}]
    assert shown["attempts"][-1]["provenance"] == receipt


def test_the_sandbox_refuses_a_container_the_engine_set_up_differently(
        settings: Settings, published: dict[str, dict[str, Any]],
        docker_client: docker.DockerClient) -> None:
    sandbox = DroppingSandbox(docker.from_env(), bare_sandbox_config(settings))
    name = f"runner-prov-{SESSION}"
    spec = ContainerSpec(name=name, image=published["echo"]["image"], cpus=0.5,
                         memory_bytes=64 * 1024 * 1024, pids_limit=16, timeout_seconds=30,
                         log_cap_bytes=1024 * 1024, input_json=b"{}",
                         labels={RUN_LABEL: f"prov-{SESSION}"})
    receipts: list[dict[str, Any]] = []
    started: list[str] = []
    with pytest.raises(SandboxMismatchError) as caught:
        sandbox.run(spec, on_log=lambda _chunk: None, on_receipt=receipts.append,
                    on_start=lambda cid, _image: started.append(cid))
    assert started == []
    problems = receipts[0]["mismatches"]
    assert any(p.startswith("pids_limit: asked 16") for p in problems), problems
    assert any(p.startswith("binds: asked []") and "docker.sock" in p for p in problems)
    assert "pids_limit" in caught.value.message
    assert docker_client.containers.list(all=True, filters={"name": name}) == []


def test_a_mismatch_ends_the_run_as_a_dead_letter_with_the_receipt_kept(
        tmp_path: Path, settings: Settings, store: Store,
        published: dict[str, dict[str, Any]], docker_client: docker.DockerClient) -> None:
    manifests = ManifestSource(write_manifest(tmp_path / "manifest.yaml", dict(published)))
    run = submit_parked(store, settings, manifests, "echo")
    since = int(time.time()) - 1
    executor = in_process_executor(
        store, manifests, DroppingSandbox(docker.from_env(), sandbox_config(settings)))
    assert executor.execute(run.id, 1) is RunStatus.DEAD_LETTER
    final = store.get_run(run.id)
    assert final is not None
    assert final.error_code == ErrorCode.SANDBOX_MISMATCH
    assert "pids_limit" in (final.error_message or "")
    receipt = store.attempts(run.id)[0]["provenance"]
    assert receipt["mismatches"] and receipt["manifest_revision"] == \
        manifests.current().revision
    # Created and removed, never started.
    events = {e["status"] for e in docker_client.events(
        since=since, until=int(time.time()) + 1, decode=True,
        filters={"label": f"{RUN_LABEL}={run.id}", "type": "container"})}
    assert "create" in events and "destroy" in events and "start" not in events
