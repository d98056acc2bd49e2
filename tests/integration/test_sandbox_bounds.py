"""The sandbox's bounds on real Docker: /run/out stops at `output_bytes` while the
processor writes (and the host's disk holds no more), /tmp is the processor's own
bounded scratch space, nothing written at run time runs, and an image `VOLUME` is
refused at publish and at launch.

The `fillup` test processor (tests/processors/fillup) writes by one pattern until a
write fails and prints `FILLED {json}`; the host side is measured in the log callback,
which the sandbox runs before it collects and removes anything, so the flood is still
all there.
"""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.types import Mount

from runner.authoring.publish import ProcessorDir, build, publish, push, registry_digest
from runner.client import RunnerClient
from runner.control.ledger import Ledger
from runner.control.lifecycle import Lifecycle
from runner.control.queue import RunQueue
from runner.control.store import Store
from runner.domain import ErrorCode, RunStatus
from runner.errors import ImageNotAllowedError, PublishError, SandboxError, SandboxMismatchError
from runner.execution.classify import classify
from runner.execution.reconciler import Reconciler
from runner.manifest import ManifestSource
from runner.sandbox import (
    INSTANCE_LABEL,
    MANAGED_LABEL,
    RUN_LABEL,
    WORKER_LABEL,
    ContainerSpec,
    Sandbox,
)
from runner.sandbox.runfs import IMAGE_NAME, image_bytes
from runner.settings import Settings
from tests.integration.conftest import (
    PG_URL,
    REGISTRY,
    SESSION,
    bare_sandbox_config,
    in_process_executor,
    submit_parked,
    write_manifest,
)
from tests.support.services import RedisServer, scratch_database

MiB = 1024 * 1024
CAP = 8 * MiB
BLOCK = 4096
PATTERNS = ["big", "small", "sparse", "deep", "links"]
# What the fillup processor may be stopped by: the filesystem is full (blocks or
# inodes), or a single file is too big.
FULL = {"ENOSPC", "EFBIG"}


class Measured:
    """The host side of one flood, measured when the processor says it is full."""

    def __init__(self, image: Path, mount: Path) -> None:
        self.image, self.mount = image, mount
        self.buffer = b""
        self.report: dict[str, Any] | None = None
        self.host: dict[str, int] = {}
        self.done = threading.Event()

    def __call__(self, chunk: bytes) -> None:
        self.buffer += chunk
        if self.report is not None or b"\n" not in self.buffer:
            return
        for line in self.buffer.split(b"\n"):
            if line.startswith(b"FILLED "):
                self.report = json.loads(line[len(b"FILLED "):])
                os.sync()  # what the host's disk holds, not what is still dirty in memory
                vfs = os.statvfs(self.mount)
                self.host = {
                    "image_allocated": os.stat(self.image).st_blocks * 512,
                    "image_size": os.stat(self.image).st_size,
                    "fs_used": (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
                }
                self.done.set()


def spec_of(image: str, name: str, input_value: dict[str, Any], *,
            output_bytes: int = CAP) -> ContainerSpec:
    return ContainerSpec(
        name=name, image=image, cpus=1.0, memory_bytes=128 * MiB, pids_limit=16,
        timeout_seconds=120, log_cap_bytes=MiB, input_json=json.dumps(input_value).encode(),
        output_bytes=output_bytes,
        labels={RUN_LABEL: f"bounds-{SESSION}", WORKER_LABEL: f"bounds-{SESSION}"})


def flood(sandbox: Sandbox, image: str, name: str, mode: str
          ) -> tuple[Measured, Any, ContainerSpec]:
    spec = spec_of(image, name, {"mode": mode})
    directory = sandbox.run_fs.directory(spec.name)
    measured = Measured(directory / IMAGE_NAME, sandbox.run_fs.path(spec.name))
    outcome = sandbox.run(spec, on_log=measured)
    assert measured.done.is_set(), measured.buffer[-2000:]
    return measured, outcome, spec


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "archive"])
@pytest.mark.parametrize("mode", PATTERNS)
def test_a_flood_of_run_out_stops_at_the_bound_and_the_host_holds_no_more(
        settings: Settings, published: dict[str, dict[str, Any]], mode: str,
        direct: bool) -> None:
    sandbox = Sandbox(docker.from_env(), replace(bare_sandbox_config(settings),
                                                 direct_volume_io=direct))
    assert sandbox.transfers.direct_io() is direct
    name = f"runner-bounds-{SESSION}-{mode}-{direct}"
    measured, outcome, spec = flood(sandbox, published["fillup"]["image"], name, mode)
    report = measured.report
    assert report is not None
    # The write past the bound failed inside the container, and the processor went on.
    assert report["errno"] in FULL, report
    assert outcome.exit_code == 0, measured.buffer[-2000:]
    # The processor never got more than the bound, in bytes or in blocks.
    assert report["bytes"] <= CAP
    assert report["statvfs_avail"] <= CAP
    if mode == "big":  # ... and the whole of it, give or take its extent blocks
        assert report["bytes"] >= CAP - 16 * BLOCK, report
    # The host holds at most the image, which is the bound plus the stated slack.
    slack = image_bytes(CAP, len(spec.input_json)) - CAP
    assert measured.host["image_size"] == CAP + slack
    assert measured.host["image_allocated"] <= CAP + slack, measured.host
    assert measured.host["fs_used"] <= CAP + slack, measured.host
    print(f"\nflood {mode} ({'direct' if direct else 'archive'}): processor wrote "
          f"{report['bytes']} bytes in {report['files']} files/dirs/links, stopped by "
          f"{report['errno']}; host: image allocated {measured.host['image_allocated']}, "
          f"fs used {measured.host['fs_used']} (bound {CAP} + slack {slack})")
    # Everything is gone after the run: filesystem, mount, image, container.
    assert not sandbox.run_fs.directory(spec.name).exists()
    assert not os.path.ismount(sandbox.run_fs.path(spec.name))


def test_a_run_through_the_worker_is_bounded_by_its_manifest_entry(
        run_and_wait: Any, client: RunnerClient,
        published: dict[str, dict[str, Any]]) -> None:
    """fillup's processor.yaml says output_bytes: 8Mi; the worker applies it."""
    assert published["fillup"]["limits"]["output_bytes"] == "8Mi"
    run = run_and_wait("fillup", {"mode": "big", "result": True})
    assert run["status"] == "succeeded", run
    result = run["result"]
    assert result["errno"] in FULL
    assert CAP - 16 * BLOCK <= result["bytes"] <= CAP
    applied = client.run(run["id"])["provenance"]["applied"]
    assert applied["run_fs"]["device_bytes"] == image_bytes(
        CAP, len(json.dumps(run["input"]).encode()))
    assert applied["run_fs"]["noexec"] and applied["run_fs"]["type"] == "ext4"
    assert applied["run_volume"]["driver"] == "local"


def test_tmp_is_the_processors_bounded_scratch_and_nothing_written_can_run(
        settings: Settings, published: dict[str, dict[str, Any]]) -> None:
    tmp_size = 8 * MiB
    sandbox = Sandbox(docker.from_env(), replace(bare_sandbox_config(settings),
                                                 tmp_size_bytes=tmp_size))
    measured, outcome, _ = flood(sandbox, published["fillup"]["image"],
                                 f"runner-bounds-{SESSION}-tmp", "tmp")
    report = measured.report
    assert report is not None and outcome.exit_code == 0, measured.buffer[-2000:]
    # Owned, so writable, by the processor's user (the tmpfs's uid=/gid=). Its mode is
    # the image's /tmp mode (runc copies it over the tmpfs's mode=): 1777 in these.
    assert report["tmp_uid"] == 65532
    assert int(report["tmp_mode"], 8) & 0o700 == 0o700
    assert report["tmp_read"] == "hello"
    # Bounded by its size.
    assert report["errno"] == "ENOSPC" and report["bytes"] <= tmp_size
    # Nothing written at run time can be executed, in /tmp or under /run.
    assert report["exec_tmp"] == "EACCES" and report["exec_out"] == "EACCES"
    assert report["write /app/x"] == "EROFS" and report["write /x"] == "EROFS"


class DroppingBoundSandbox(Sandbox):
    """An engine (or a create path) that mounts a plain volume at /run, without the
    bounded filesystem."""

    def _host_config(self, spec: ContainerSpec) -> dict[str, Any]:
        config = super()._host_config(spec)
        config["Mounts"] = [{"Type": "volume", "Target": "/run", "Source": "",
                             "VolumeOptions": {"NoCopy": True}}]
        return config


class ExtraMountSandbox(Sandbox):
    """One that adds a writable volume next to /run (as an image VOLUME would)."""

    def _host_config(self, spec: ContainerSpec) -> dict[str, Any]:
        config = super()._host_config(spec)
        config["Mounts"] = [*config["Mounts"],
                            dict(Mount(target="/data", source=None, type="volume"))]
        return config


@pytest.mark.parametrize(("kind", "problem"), [(DroppingBoundSandbox, "run_volume"),
                                               (ExtraMountSandbox, "container_mounts")])
def test_a_container_without_the_bound_or_with_another_mount_never_starts(
        settings: Settings, published: dict[str, dict[str, Any]],
        docker_client: docker.DockerClient, kind: type[Sandbox], problem: str) -> None:
    sandbox = kind(docker.from_env(), bare_sandbox_config(settings))
    spec = spec_of(published["fillup"]["image"], f"runner-bounds-{SESSION}-{problem}",
                   {"mode": "big"})
    receipts: list[dict[str, Any]] = []
    started: list[str] = []
    with pytest.raises(SandboxMismatchError) as caught:
        sandbox.run(spec, on_log=lambda _chunk: None, on_receipt=receipts.append,
                    on_start=lambda cid, _image: started.append(cid))
    assert started == []
    assert problem in caught.value.message
    assert any(p.startswith(f"{problem}:") for p in receipts[0]["mismatches"])
    assert docker_client.containers.list(all=True, filters={"name": spec.name}) == []
    assert not sandbox.run_fs.directory(spec.name).exists()


# Image VOLUME ---------------------------------------------------------------------

VOLUME_DOCKERFILE = textwrap.dedent("""\
    FROM runner-base/busybox:local
    VOLUME /data
    COPY main.sh /app/main.sh
    USER 65532:65532
    ENTRYPOINT ["/bin/sh", "/app/main.sh"]
    """)


@pytest.fixture(scope="module")
def volume_processor(tmp_path_factory: pytest.TempPathFactory,
                     docker_client: docker.DockerClient) -> Iterator[ProcessorDir]:
    """A processor whose image declares VOLUME /data (kept out of tests/processors,
    which are all published by the session); its local image is removed after."""
    path = tmp_path_factory.mktemp("volume-processor")
    (path / "processor.yaml").write_text(textwrap.dedent(f"""\
        name: withvolume-{SESSION}
        version: "1.0.0"
        description: "Test processor: its image declares a VOLUME."
        limits: {{cpus: 0.2, memory: 32Mi, pids: 16, timeout: 30s}}
        """))
    (path / "Dockerfile").write_text(VOLUME_DOCKERFILE)
    (path / "main.sh").write_text("echo hi > /data/x; echo wrote /data/x\n")
    proc = ProcessorDir.load(path)
    yield proc
    tag = f"{proc.repository(REGISTRY)}:{proc.version}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(tag, force=True)


def test_publish_refuses_an_image_that_declares_a_volume(
        volume_processor: ProcessorDir, docker_client: docker.DockerClient) -> None:
    with pytest.raises(PublishError) as caught:
        publish(volume_processor.path, registry=REGISTRY, client=docker_client)
    assert "VOLUME /data" in caught.value.message
    # Refused before the push: the registry has no such tag.
    with pytest.raises(PublishError, match="registry has no"):
        registry_digest(volume_processor.repository(REGISTRY), volume_processor.version)


def test_a_pinned_image_with_a_volume_is_refused_at_launch(
        tmp_path: Path, settings: Settings, store: Store, volume_processor: ProcessorDir,
        published: dict[str, dict[str, Any]], docker_client: docker.DockerClient) -> None:
    # Published some other way (by a tool that does not check), and pinned.
    build(volume_processor, registry=REGISTRY, client=docker_client)
    image = push(volume_processor, registry=REGISTRY, client=docker_client)
    with pytest.raises(ImageNotAllowedError, match="/data"):
        Sandbox(docker.from_env(), bare_sandbox_config(settings)).ensure_image(image)

    entries = {**published, volume_processor.name: {
        "name": volume_processor.name, "version": "1.0.0", "image": image}}
    manifests = ManifestSource(write_manifest(tmp_path / "manifest.yaml", entries))
    run = submit_parked(store, settings, manifests, volume_processor.name)
    since = int(time.time()) - 1
    executor = in_process_executor(
        store, manifests, Sandbox(docker.from_env(), bare_sandbox_config(settings)))
    assert executor.execute(run.id, 1) is RunStatus.DEAD_LETTER
    final = store.get_run(run.id)
    assert final is not None
    assert final.error_code == ErrorCode.IMAGE_NOT_ALLOWED
    assert "VOLUME /data" in (final.error_message or "")
    # Never created, let alone started.
    events = list(docker_client.events(since=since, until=int(time.time()) + 1, decode=True,
                                       filters={"label": f"{RUN_LABEL}={run.id}"}))
    assert events == []


# Leftovers -------------------------------------------------------------------------

@pytest.fixture
def empty_store() -> Any:
    """A database of its own: the reconciler under test finds no run of the session's."""
    with scratch_database(PG_URL, f"runner_sweep_{SESSION}") as url:
        store = Store(url)
        yield store
        store.close()


def test_the_reconciler_sweeps_leftover_volumes_and_filesystems_nothing_uses(
        settings: Settings, empty_store: Store, rel_redis: RedisServer, manifest_path: Path,
        published: dict[str, dict[str, Any]], docker_client: docker.DockerClient) -> None:
    store = empty_store
    config = replace(bare_sandbox_config(settings), instance=f"sweep-{SESSION}")
    sandbox = Sandbox(docker.from_env(), config)
    labels = {MANAGED_LABEL: "true", INSTANCE_LABEL: config.instance}
    api = docker_client.api
    # A /run volume left by a container removed without -v; one a container still uses.
    left = api.create_volume(labels=labels)["Name"]
    used = api.create_volume(labels=labels)["Name"]
    # (Not labelled as ours: the container sweep of the same pass would remove it.)
    holder = api.create_container(
        published["fillup"]["image"], name=f"runner-sweep-{SESSION}-holder",
        host_config=api.create_host_config(mounts=[Mount(target="/x", source=used)]))
    # A filesystem whose worker died (its lock went with it), and one a worker holds.
    dead = sandbox.run_fs.create(f"runner-sweep-{SESSION}-dead", output_bytes=MiB,
                                 input_bytes=2)
    assert dead.lock_fd is not None
    os.close(dead.lock_fd)
    dead.lock_fd = None
    live = sandbox.run_fs.create(f"runner-sweep-{SESSION}-live", output_bytes=MiB,
                                 input_bytes=2)
    try:
        reconciler = Reconciler(ledger=Ledger(store, Lifecycle(store)),
                                queue=RunQueue.from_url(rel_redis.url), sandbox=sandbox,
                                manifests=ManifestSource(manifest_path), grace_seconds=0)
        assert not reconciler.run_once().skipped
        volumes = {v["Name"] for v in api.volumes(filters={"label": list(
            f"{k}={v}" for k, v in labels.items())})["Volumes"] or []}
        assert left not in volumes and used in volumes
        assert not dead.directory.exists() and not os.path.ismount(dead.path)
        assert live.directory.exists() and os.path.ismount(live.path)
    finally:
        api.remove_container(holder["Id"], force=True)
        api.remove_volume(used)
        sandbox.run_fs.release(live)
        sandbox.run_fs.release(dead)


def test_a_run_refuses_to_start_without_a_bound_it_cannot_make(
        settings: Settings, published: dict[str, dict[str, Any]]) -> None:
    """Said once, at the first run (and by `check_engine` at a worker's start)."""
    sandbox = Sandbox(docker.from_env(), bare_sandbox_config(settings))
    assert sandbox.bound_problem() == ""  # this process: root, the tools, a local engine
    sandbox.check_engine()  # what a worker checks at its start
    remote = Sandbox(docker.DockerClient(base_url="tcp://127.0.0.1:9", version="1.41"),
                     bare_sandbox_config(settings))
    assert "not on this host" in remote.bound_problem()
    spec = spec_of(published["fillup"]["image"], f"runner-bounds-{SESSION}-remote",
                   {"mode": "big"})
    with pytest.raises(SandboxError, match="without its output_bytes bound"):
        remote.run(spec, on_log=lambda _chunk: None)
    outcome = sandbox.run(replace(spec, input_json=b'{"mode": "big", "result": true}'),
                          on_log=lambda _chunk: None)
    assert classify(outcome).result["errno"] in FULL
