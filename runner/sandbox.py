"""Run one container from a pinned image, locked down, and report what happened.

Docker only: this module knows nothing of the API, the database or the queue. A
processor's failure (non-zero exit, OOM, timeout, bad result file) is returned as
data in `Outcome`; only failures of the platform raise (`SandboxError` children).
Input and output travel through the Docker API (put/get archive on a per-attempt
volume), never through host paths, so the worker may itself run in a container
that only has the host's Docker socket.
"""

from __future__ import annotations

import contextlib
import io
import math
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import docker
import docker.errors
import requests.exceptions
import structlog
from docker.types import LogConfig, Mount

from runner.errors import (
    DigestMismatchError,
    DockerUnavailableError,
    ImagePullError,
    SandboxError,
)

log = structlog.get_logger(__name__)

MANAGED_LABEL = "io.container-runner.managed"
# Which deployment (database) made a container: a reconciler only ever touches its
# own, so two runners sharing one Docker engine cannot remove each other's.
INSTANCE_LABEL = "io.container-runner.instance"
RUN_LABEL = "io.container-runner.run-id"
ATTEMPT_LABEL = "io.container-runner.attempt"
WORKER_LABEL = "io.container-runner.worker-id"

# Inside the container: a private tmpfs, not the host's /tmp.
CONTAINER_TMP = "/tmp"  # noqa: S108
RESULT_PATH = "/run/out/result.json"

# Go os.FileMode type bits, as the engine reports them in archive stat headers.
_MODE_DIR = 1 << 31
_MODE_SYMLINK = 1 << 27
_MODE_TYPE = _MODE_DIR | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19)

LogSink = Callable[[bytes], None]


@dataclass(frozen=True)
class SandboxConfig:
    """Platform-wide container settings (from `Settings`)."""

    user: str = "65532:65532"
    tmp_size_bytes: int = 64 * 1024 * 1024
    stop_grace_seconds: float = 5.0
    result_max_bytes: int = 1024 * 1024
    instance: str = "default"


@dataclass(frozen=True)
class ContainerSpec:
    """One attempt's container: what runs, under which limits, with which input."""

    name: str
    image: str
    cpus: float
    memory_bytes: int
    pids_limit: int
    timeout_seconds: float
    log_cap_bytes: int
    input_json: bytes
    environment: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)


class ResultStatus(StrEnum):
    ABSENT = "absent"
    OK = "ok"
    SYMLINK = "symlink"
    NOT_REGULAR = "not_regular"
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class CollectedResult:
    status: ResultStatus
    data: bytes | None = None
    size: int = 0


@dataclass(frozen=True)
class Outcome:
    """How a container ended; a processor's failure is data, not an exception."""

    container_id: str
    image_id: str
    exit_code: int | None
    oom_killed: bool
    timed_out: bool
    duration_seconds: float
    log_bytes: int
    log_truncated: bool
    result: CollectedResult


@contextmanager
def _docker_errors(stage: str) -> Iterator[None]:
    """Turn docker-py and transport errors into the runner's error tree."""
    try:
        yield
    except requests.exceptions.ConnectionError as exc:
        raise DockerUnavailableError(f"Docker engine unreachable during {stage}: {exc}",
                                     stage=stage) from exc
    except docker.errors.DockerException as exc:
        if isinstance(exc, docker.errors.APIError) and exc.is_server_error():
            explanation = exc.explanation or str(exc)
            if "Cannot connect" in str(explanation) or "daemon" in str(explanation).lower():
                raise DockerUnavailableError(f"{stage}: {explanation}", stage=stage) from exc
        raise SandboxError(f"{stage}: {exc}", stage=stage) from exc


class _LogPump:
    """Copies a container's output to a sink in a thread, up to a byte cap."""

    def __init__(self, api: docker.APIClient, container_id: str, cap: int, sink: LogSink) -> None:
        self.api, self.container_id, self.cap, self.sink = api, container_id, cap, sink
        self.bytes = 0
        self.truncated = False
        self.error: BaseException | None = None
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{container_id[:12]}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._stream = self.api.logs(self.container_id, stream=True, follow=True,
                                         stdout=True, stderr=True)
            for chunk in self._stream:
                room = self.cap - self.bytes
                if len(chunk) > room:
                    if room > 0:
                        self.sink(chunk[:room])
                        self.bytes += room
                    self.truncated = True
                    self.sink(f"\n[runner: output truncated at {self.cap} bytes]\n".encode())
                    break
                self.sink(chunk)
                self.bytes += len(chunk)
        except Exception as exc:  # noqa: BLE001 - reported to the caller after join
            self.error = exc
        finally:
            self.close()

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            # Closing a stream whose connection already died may fail; that is harmless.
            with contextlib.suppress(Exception):
                stream.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            # The engine keeps a follow stream open a moment past exit; cut it.
            self.close()
            self._thread.join(5)


def _input_archive(input_json: bytes, uid: int, gid: int) -> bytes:
    """A tar holding `input.json` (read-only, root's) and `out/` (the processor's)."""
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("input.json")
        info.size, info.mode, info.mtime = len(input_json), 0o444, now
        tar.addfile(info, io.BytesIO(input_json))
        out = tarfile.TarInfo("out")
        out.type, out.mode, out.mtime, out.uid, out.gid = tarfile.DIRTYPE, 0o700, now, uid, gid
        tar.addfile(out)
    return buffer.getvalue()


class Sandbox:
    """Creates, runs, and always removes processor containers."""

    def __init__(self, client: docker.DockerClient, config: SandboxConfig) -> None:
        self.client = client
        self.api: docker.APIClient = client.api
        self.config = config
        uid, _, gid = config.user.partition(":")
        self._uid, self._gid = int(uid), int(gid or uid)
        if self._uid == 0:
            raise SandboxError("refusing to run processors as root (container_user uid 0)")

    @classmethod
    def from_env(cls, config: SandboxConfig, *, timeout: float = 60) -> Sandbox:
        """A sandbox on the engine named by DOCKER_HOST (or the local socket).

        Raises:
            DockerUnavailableError: the engine does not answer.
        """
        try:
            client = docker.from_env(timeout=int(timeout))
        except docker.errors.DockerException as exc:
            raise DockerUnavailableError(f"Docker engine unreachable: {exc}",
                                         stage="connect") from exc
        return cls(client, config)

    def ping(self) -> None:
        with _docker_errors("ping"):
            self.api.ping()

    def ensure_image(self, ref: str) -> str:
        """Make the pinned image local (pulling by digest only when missing); its id.

        Raises:
            ImagePullError: the registry did not deliver the image.
            DigestMismatchError: the local image does not carry the pinned digest.
            DockerUnavailableError: the engine is unreachable.
        """
        repo, _, digest = ref.partition("@")
        with _docker_errors("inspect image"):
            try:
                attrs = self.api.inspect_image(ref)
            except docker.errors.ImageNotFound:
                attrs = None
        if attrs is None:
            started = time.monotonic()
            try:
                with _docker_errors("pull"):
                    self.api.pull(repo, tag=digest)
            except DockerUnavailableError:
                raise
            except SandboxError as exc:
                raise ImagePullError(f"pull of {ref} failed: {exc.__cause__ or exc}",
                                     image=ref) from exc
            log.info("image_pulled", image=ref,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
            with _docker_errors("inspect image"):
                try:
                    attrs = self.api.inspect_image(ref)
                except docker.errors.ImageNotFound as exc:
                    raise ImagePullError(f"{ref} is not local after its pull",
                                         image=ref) from exc
        if ref not in (attrs.get("RepoDigests") or []):
            raise DigestMismatchError(
                f"local image {attrs.get('Id')} does not carry the pinned digest {ref}",
                image=ref)
        image_id: str = attrs["Id"]
        return image_id

    def _labels(self, spec: ContainerSpec) -> dict[str, str]:
        return {MANAGED_LABEL: "true", INSTANCE_LABEL: self.config.instance, **spec.labels}

    def _host_config(self, spec: ContainerSpec) -> dict[str, Any]:
        labels = self._labels(spec)
        log_max = max(spec.log_cap_bytes * 2, 1024 * 1024)
        host_config: dict[str, Any] = self.api.create_host_config(
            nano_cpus=int(spec.cpus * 1e9),
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            pids_limit=spec.pids_limit,
            network_mode="none",
            read_only=True,
            tmpfs={CONTAINER_TMP: f"rw,noexec,nosuid,nodev,size={self.config.tmp_size_bytes}"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,
            mounts=[Mount(target="/run", source=None, type="volume", no_copy=True,
                          labels=labels)],
            log_config=LogConfig(type="json-file",
                                 config={"max-size": str(log_max), "max-file": "2"}),
        )
        return host_config

    def _create(self, spec: ContainerSpec, image_id: str) -> str:
        labels = self._labels(spec)
        for _ in range(2):
            try:
                with _docker_errors("create"):
                    created = self.api.create_container(
                        image=image_id, name=spec.name, user=self.config.user,
                        environment=dict(spec.environment), labels=labels,
                        host_config=self._host_config(spec), working_dir=CONTAINER_TMP,
                        network_disabled=True,
                    )
                container_id: str = created["Id"]
                return container_id
            except SandboxError as exc:
                cause = exc.__cause__
                if not (isinstance(cause, docker.errors.APIError)
                        and cause.status_code == 409):
                    raise
                # Deterministic names make a leftover of this same attempt a 409: it is
                # ours, from a crashed try, so replace it.
                log.warning("container_name_taken", name=spec.name)
                self._remove(spec.name)
        raise SandboxError(f"container name {spec.name} stays taken")

    def _remove(self, container: str) -> None:
        try:
            with _docker_errors("remove"):
                self.api.remove_container(container, v=True, force=True)
        except SandboxError as exc:
            if not isinstance(exc.__cause__, docker.errors.NotFound):
                raise

    def _wait(self, container_id: str, deadline: float) -> bool:
        """Wait for exit until `deadline`; True if the container exited in time."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                with _docker_errors("wait"):
                    self.api.wait(container_id, timeout=max(remaining, 0.05))
                return True
            except DockerUnavailableError as exc:
                # A read timeout on the wait call arrives as a ConnectionError; tell it
                # apart from a dead engine by asking the engine.
                if not isinstance(exc.__cause__, requests.exceptions.ConnectionError):
                    raise
                with _docker_errors("inspect"):
                    state = self.api.inspect_container(container_id)["State"]
                if not state.get("Running"):
                    return True
            except requests.exceptions.ReadTimeout:
                continue

    def _collect_result(self, container_id: str) -> CollectedResult:
        """Read `/run/out/result.json` through the engine, refusing links and big files."""
        cap = self.config.result_max_bytes
        with _docker_errors("collect"):
            try:
                stream, stat = self.api.get_archive(container_id, RESULT_PATH,
                                                    chunk_size=64 * 1024)
            except docker.errors.NotFound:
                return CollectedResult(ResultStatus.ABSENT)
        try:
            mode, size = int(stat.get("mode", 0)), int(stat.get("size", 0))
            if stat.get("linkTarget") or mode & _MODE_SYMLINK:
                return CollectedResult(ResultStatus.SYMLINK, size=size)
            if mode & _MODE_TYPE:
                return CollectedResult(ResultStatus.NOT_REGULAR, size=size)
            if size > cap:
                return CollectedResult(ResultStatus.TOO_LARGE, size=size)
            buffer = bytearray()
            limit = cap + 64 * 1024  # tar headers and padding around the file
            with _docker_errors("collect"):
                for chunk in stream:
                    buffer += chunk
                    if len(buffer) > limit:
                        return CollectedResult(ResultStatus.TOO_LARGE, size=len(buffer))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        with tarfile.open(fileobj=io.BytesIO(bytes(buffer)), mode="r") as tar:
            member = tar.next()
            if member is None:
                return CollectedResult(ResultStatus.ABSENT)
            if member.issym() or member.islnk():
                return CollectedResult(ResultStatus.SYMLINK, size=member.size)
            if not member.isreg():
                return CollectedResult(ResultStatus.NOT_REGULAR, size=member.size)
            if member.size > cap:
                return CollectedResult(ResultStatus.TOO_LARGE, size=member.size)
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted is not None else b""
        return CollectedResult(ResultStatus.OK, data=data, size=len(data))

    def run(self, spec: ContainerSpec, *, on_log: LogSink,
            on_start: Callable[[str, str], None] | None = None) -> Outcome:
        """Run the container to its end and remove it, whatever happens.

        Raises:
            SandboxError: the platform failed (the container is still removed).
        """
        image_id = self.ensure_image(spec.image)
        bound = log.bind(container_name=spec.name)
        started = time.monotonic()
        container_id = self._create(spec, image_id)
        try:
            with _docker_errors("deliver input"):
                self.api.put_archive(container_id, "/run",
                                     _input_archive(spec.input_json, self._uid, self._gid))
            with _docker_errors("start"):
                self.api.start(container_id)
            started = time.monotonic()
            if on_start is not None:
                on_start(container_id, image_id)
            pump = _LogPump(self.api, container_id, spec.log_cap_bytes, on_log)
            pump.start()
            exited = self._wait(container_id, started + spec.timeout_seconds)
            timed_out = not exited
            if timed_out:
                bound.info("container_timeout", timeout_s=spec.timeout_seconds)
                with _docker_errors("stop"):
                    # SIGTERM, then SIGKILL after the grace period, done by the engine.
                    self.api.stop(container_id,
                                  timeout=math.ceil(self.config.stop_grace_seconds))
                self._wait(container_id, time.monotonic() + self.config.stop_grace_seconds + 30)
            duration = time.monotonic() - started
            pump.join(timeout=10)
            with _docker_errors("inspect"):
                state = self.api.inspect_container(container_id)["State"]
            exit_code = state.get("ExitCode")
            oom_killed = bool(state.get("OOMKilled"))
            result = CollectedResult(ResultStatus.ABSENT)
            if exit_code == 0 and not timed_out:
                result = self._collect_result(container_id)
            if pump.error is not None:
                bound.warning("log_capture_failed", error=str(pump.error))
            return Outcome(
                container_id=container_id, image_id=image_id, exit_code=exit_code,
                oom_killed=oom_killed, timed_out=timed_out, duration_seconds=duration,
                log_bytes=pump.bytes, log_truncated=pump.truncated, result=result,
            )
        finally:
            try:
                self._remove(container_id)
            except SandboxError as exc:
                bound.error("container_remove_failed", container_id=container_id,
                            error=str(exc))

    def stop(self, container_id: str) -> None:
        """SIGTERM now, SIGKILL after the grace period (cancel, drain, lost lease)."""
        try:
            with _docker_errors("stop"):
                self.api.stop(container_id, timeout=math.ceil(self.config.stop_grace_seconds))
        except SandboxError as exc:
            if not isinstance(exc.__cause__, docker.errors.NotFound):
                raise

    def remove(self, container_id: str) -> None:
        """Kill and remove a container and its /run volume; a missing one is fine."""
        self._remove(container_id)

    def managed_containers(self, **label_filters: str) -> list[dict[str, Any]]:
        """Containers this deployment created (by label), optionally narrowed further."""
        labels = [MANAGED_LABEL, f"{INSTANCE_LABEL}={self.config.instance}"]
        labels += [f"{k}={v}" for k, v in label_filters.items()]
        with _docker_errors("list"):
            found: list[dict[str, Any]] = self.api.containers(all=True,
                                                              filters={"label": labels})
        return found
