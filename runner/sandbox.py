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
import contextvars
import errno
import functools
import io
import math
import os
import queue
import re
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
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
    SandboxMismatchError,
)
from runner.telemetry import NullStages, StageObserver

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
IMAGE_ID = re.compile(r"^sha256:[a-f0-9]{64}$")

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
    # Workers remove a finished container in a background thread, after its result is
    # read, so the removal is off the run's critical path (and overlaps the next run).
    remove_in_background: bool = False
    # `runner processor run` only: accept a bare local image id (sha256:<64 hex>) of an
    # image built here and never pushed; inspected, never pulled. The manifest cannot
    # hold a bare id, so a worker never takes this path.
    allow_image_ids: bool = False
    # On a local engine without user-namespace remapping, write the input into and read
    # the result from the /run volume's directory on the host (the mount point the
    # engine reports), instead of two archive API calls; those re-mount the container's
    # root filesystem and cost 100 ms or more each on some storage drivers. The engine
    # path is the fallback whenever the directory is not reachable from this process.
    direct_volume_io: bool = True


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
    log_bytes_dropped: int = 0


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
        self.dropped = 0
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
                    # Reading on would make a flood cost the worker CPU for nothing: stop
                    # here, so `dropped` is a lower bound (what was read and not kept).
                    self.dropped += len(chunk) - max(room, 0)
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


class _Remover:
    """Runs removals one after another in a daemon thread, in submission order."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._loop, name="remover", daemon=True).start()

    def submit(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            except Exception:  # one failed removal must not stop the rest
                log.exception("background_remove_failed")
            finally:
                self._tasks.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted removal is done; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while self._tasks.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def nano_cpus(cpus: float) -> int:
    """The engine's unit for a CPU limit (rounded, never truncated: 4.1 stays 4.1)."""
    return round(cpus * 1e9)


def expected_settings(spec: ContainerSpec, config: SandboxConfig,
                      image_id: str) -> dict[str, Any]:
    """What the manifest and the platform ask of a container, in the shape of
    `applied_settings` (computed from the spec, not from the create call, so a
    create path that drops a setting cannot also hide it)."""
    return {
        "image_id": image_id, "user": config.user, "cpus": nano_cpus(spec.cpus) / 1e9,
        "memory_bytes": spec.memory_bytes, "memory_swap_bytes": spec.memory_bytes,
        "pids_limit": spec.pids_limit, "network_mode": "none", "network_disabled": True,
        "read_only_rootfs": True, "privileged": False, "cap_drop": ["ALL"], "cap_add": [],
        "security_opt": ["no-new-privileges"], "init": True,
        "tmpfs": {CONTAINER_TMP: f"rw,noexec,nosuid,nodev,size={config.tmp_size_bytes}"},
        "mounts": [{"type": "volume", "target": "/run"}], "binds": [], "devices": [],
        "pid_mode": "", "log_driver": "json-file",
    }


def applied_settings(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What the engine reports it applied to a created container (`inspect`)."""
    host, config = attrs.get("HostConfig") or {}, attrs.get("Config") or {}
    return {
        "image_id": attrs.get("Image"), "user": config.get("User"),
        "cpus": (host.get("NanoCpus") or 0) / 1e9,
        "memory_bytes": host.get("Memory"), "memory_swap_bytes": host.get("MemorySwap"),
        "pids_limit": host.get("PidsLimit"), "network_mode": host.get("NetworkMode"),
        "network_disabled": bool(config.get("NetworkDisabled")),
        "read_only_rootfs": bool(host.get("ReadonlyRootfs")),
        "privileged": bool(host.get("Privileged")),
        "cap_drop": list(host.get("CapDrop") or []), "cap_add": list(host.get("CapAdd") or []),
        "security_opt": list(host.get("SecurityOpt") or []), "init": bool(host.get("Init")),
        "tmpfs": dict(host.get("Tmpfs") or {}),
        "mounts": [{"type": m.get("Type"), "target": m.get("Target")}
                   for m in host.get("Mounts") or []],
        "binds": list(host.get("Binds") or []), "devices": list(host.get("Devices") or []),
        "pid_mode": host.get("PidMode") or "",
        "log_driver": (host.get("LogConfig") or {}).get("Type"),
    }


def mismatches(expected: Mapping[str, Any], applied: Mapping[str, Any]) -> list[str]:
    """Each setting the engine reports differently from what was asked, as a line."""
    return [f"{key}: asked {value!r}, engine reports {applied.get(key)!r}"
            for key, value in expected.items() if applied.get(key) != value]


class Sandbox:
    """Creates, runs, and always removes processor containers."""

    def __init__(self, client: docker.DockerClient, config: SandboxConfig) -> None:
        self.client = client
        self.api: docker.APIClient = client.api
        self.config = config
        uid, _, gid = config.user.partition(":")
        self._uid, self._gid = int(uid), int(gid or uid)
        # Pinned reference -> verified local image id. Image ids are content hashes, so
        # an entry can only go stale by the image being deleted: create then fails with
        # 404 and the entry is dropped and checked again.
        self._verified: dict[str, str] = {}
        self._remover = _Remover() if config.remove_in_background else None
        self._direct: bool | None = None  # decided on first use (one `info` call)
        if self.api.base_url.startswith("http+docker:"):
            # A local socket: no proxy or .netrc can apply, and requests would look
            # them up in the environment on every call (about 2 ms of CPU per run).
            self.api.trust_env = False
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

    def check_engine(self) -> None:
        """Refuse to work on an engine that cannot enforce the limits every container
        gets: each run there would only end as sandbox_mismatch.

        Raises:
            SandboxError: the engine lacks swap or pids limits (named, with the fix).
        """
        with _docker_errors("info"):
            info = self.api.info()
        missing = [what for key, what in (
            ("SwapLimit", "swap limits (cgroup v1: boot the kernel with swapaccount=1)"),
            ("PidsLimit", "pids limits (the pids cgroup controller)"),
            ("MemoryLimit", "memory limits")) if info.get(key) is False]
        if missing:
            raise SandboxError("the Docker engine cannot enforce " + "; ".join(missing)
                               + ": processors would run without them, so no run starts")

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
        return self._ensure_image(ref)[0]

    def prefetch(self, refs: list[str]) -> dict[str, str]:
        """Make each pinned image local ahead of its first run (at worker start and
        after a manifest change), so no run waits for a pull. Problems are logged,
        not raised: the run itself reports them. Returns ref -> problem."""
        problems: dict[str, str] = {}
        for ref in refs:
            if ref in self._verified:
                continue
            try:
                self._ensure_image(ref)
            except SandboxError as exc:
                problems[ref] = exc.message
                log.warning("image_prefetch_failed", image=ref, error=exc.message)
        return problems

    def _ensure_image(self, ref: str) -> tuple[str, bool]:
        """The image id, and whether it had to be pulled."""
        known = self._verified.get(ref)
        if known is not None:
            return known, False
        if self.config.allow_image_ids and IMAGE_ID.match(ref):
            return self._local_image(ref), False
        image_id, pulled = self._check_image(ref)
        self._verified[ref] = image_id
        return image_id, pulled

    def _local_image(self, image_id: str) -> str:
        with _docker_errors("inspect image"):
            try:
                attrs = self.api.inspect_image(image_id)
            except docker.errors.ImageNotFound as exc:
                raise ImagePullError(f"no local image {image_id}", image=image_id) from exc
        found: str = attrs["Id"]
        return found

    def _check_image(self, ref: str) -> tuple[str, bool]:
        repo, _, digest = ref.partition("@")
        pulled = False
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
            pulled = True
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
        return image_id, pulled

    def _labels(self, spec: ContainerSpec) -> dict[str, str]:
        return {MANAGED_LABEL: "true", INSTANCE_LABEL: self.config.instance, **spec.labels}

    def _host_config(self, spec: ContainerSpec) -> dict[str, Any]:
        labels = self._labels(spec)
        log_max = max(spec.log_cap_bytes * 2, 1024 * 1024)
        host_config: dict[str, Any] = self.api.create_host_config(
            nano_cpus=nano_cpus(spec.cpus),
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

    def _verify(self, container_id: str, spec: ContainerSpec, image_id: str
                ) -> tuple[dict[str, Any], Path | None]:
        """The provenance receipt of a created container, read back from the engine,
        and the host directory of its /run volume when this process may use it."""
        with _docker_errors("inspect"):
            attrs = self.api.inspect_container(container_id)
        expected = expected_settings(spec, self.config, image_id)
        applied = applied_settings(attrs)
        receipt = {"pinned": spec.image, "image_id": applied["image_id"],
                   "applied": applied, "mismatches": mismatches(expected, applied),
                   "verified_at": datetime.now(UTC).isoformat()}
        return receipt, self._run_dir(attrs)

    def _direct_io(self) -> bool:
        if self._direct is None:
            # Only root can give out/ to the processor's uid; a remote engine's paths are
            # not ours (ssh:// also looks local to docker-py, but its paths are absent).
            if not (self.config.direct_volume_io and os.geteuid() == 0
                    and self.api.base_url.startswith("http+docker:")):
                self._direct = False
                return False
            try:
                with _docker_errors("info"):
                    options = " ".join(self.api.info().get("SecurityOptions") or [])
            except SandboxError as exc:
                # Undecided: this run takes the archive path, the next one asks again
                # (a pooled connection the engine dropped fails once, like this).
                log.warning("direct_volume_io_undecided", error=exc.message)
                return False
            # Remapped or rootless engines own the files under other ids than ours.
            self._direct = "userns" not in options and "rootless" not in options
        return self._direct

    def _run_dir(self, attrs: Mapping[str, Any]) -> Path | None:
        if not self._direct_io():
            return None
        for mount in attrs.get("Mounts") or []:
            if mount.get("Destination") == "/run" and mount.get("Type") == "volume":
                source = mount.get("Source")
                if source and os.path.isdir(source) and os.access(source, os.W_OK):
                    return Path(source)
        return None

    def _deliver_input_direct(self, run_dir: Path, input_json: bytes) -> None:
        """The same files the archive holds: input.json (root's, read-only) and out/
        (the processor's), written before the container ever runs."""
        directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = os.open("input.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o444, dir_fd=directory)
            try:
                view = memoryview(input_json)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, 0o444)
            finally:
                os.close(fd)
            os.mkdir("out", 0o700, dir_fd=directory)
            os.chown("out", self._uid, self._gid, dir_fd=directory, follow_symlinks=False)
            os.chmod("out", 0o700, dir_fd=directory)
        finally:
            os.close(directory)

    def _collect_result_direct(self, run_dir: Path) -> CollectedResult:
        """Read out/result.json from the volume's directory without following a link
        anywhere and without blocking on a FIFO; the same verdicts as the archive path."""
        cap = self.config.result_max_bytes
        directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                out = os.open("out", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=directory)
            except OSError:
                return CollectedResult(ResultStatus.ABSENT)
            try:
                try:
                    fd = os.open("result.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                 | os.O_NOCTTY, dir_fd=out)
                except FileNotFoundError:
                    return CollectedResult(ResultStatus.ABSENT)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        size = os.stat("result.json", dir_fd=out, follow_symlinks=False).st_size
                        return CollectedResult(ResultStatus.SYMLINK, size=size)
                    return CollectedResult(ResultStatus.NOT_REGULAR)
                try:
                    info = os.fstat(fd)
                    if not stat.S_ISREG(info.st_mode):
                        return CollectedResult(ResultStatus.NOT_REGULAR, size=info.st_size)
                    if info.st_size > cap:
                        return CollectedResult(ResultStatus.TOO_LARGE, size=info.st_size)
                    chunks, total = [], 0
                    while total <= cap and (chunk := os.read(fd, cap + 1 - total)):
                        chunks.append(chunk)
                        total += len(chunk)
                    data = b"".join(chunks)
                    if len(data) > cap:
                        return CollectedResult(ResultStatus.TOO_LARGE, size=len(data))
                    return CollectedResult(ResultStatus.OK, data=data, size=len(data))
                finally:
                    os.close(fd)
            finally:
                os.close(out)
        finally:
            os.close(directory)

    def _remove(self, container: str) -> None:
        try:
            with _docker_errors("remove"):
                self.api.remove_container(container, v=True, force=True)
        except SandboxError as exc:
            cause = exc.__cause__
            if isinstance(cause, docker.errors.NotFound):
                return
            # Another remover (the reconciler's sweep, say) got there first.
            if (isinstance(cause, docker.errors.APIError) and cause.status_code == 409
                    and "in progress" in str(cause.explanation or "")):
                return
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
            on_start: Callable[[str, str], None] | None = None,
            stages: StageObserver | None = None,
            on_receipt: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
        """Run the container to its end and remove it, whatever happens.

        `stages` is told about each stage (pull, create, start, wait, collect,
        remove) so the caller can time, trace and log them. `on_receipt` gets the
        provenance receipt (what was asked, what the engine applied) before the start;
        a container whose settings do not match is removed and never started.

        Raises:
            SandboxError: the platform failed (the container is still removed).
        """
        observer: StageObserver = stages or NullStages()
        with observer.stage("pull", image=spec.image) as info:
            image_id, pulled = self._ensure_image(spec.image)
            info["cached"] = not pulled
        bound = log.bind(container_name=spec.name)
        with observer.stage("create", container_name=spec.name) as info:
            try:
                container_id = self._create(spec, image_id)
            except SandboxError as exc:
                if not isinstance(exc.__cause__, docker.errors.ImageNotFound):
                    raise
                # The image went away since it was verified: check (and pull) again.
                self._verified.pop(spec.image, None)
                image_id, _ = self._ensure_image(spec.image)
                container_id = self._create(spec, image_id)
            info["container_id"] = container_id[:12]
        finished = False
        try:
            with observer.stage("start", input_bytes=len(spec.input_json)):
                receipt, run_dir = self._verify(container_id, spec, image_id)
                if on_receipt is not None:
                    on_receipt(receipt)
                if receipt["mismatches"]:
                    raise SandboxMismatchError(
                        "the engine did not apply what was asked: "
                        + "; ".join(receipt["mismatches"]), stage="create")
                if run_dir is not None:
                    try:
                        self._deliver_input_direct(run_dir, spec.input_json)
                    except OSError as exc:
                        raise SandboxError(f"deliver input: {exc}", stage="deliver input"
                                           ) from exc
                else:
                    with _docker_errors("deliver input"):
                        self.api.put_archive(container_id, "/run", _input_archive(
                            spec.input_json, self._uid, self._gid))
                with _docker_errors("start"):
                    self.api.start(container_id)
            started = time.monotonic()
            if on_start is not None:
                on_start(container_id, image_id)
            pump = _LogPump(self.api, container_id, spec.log_cap_bytes, on_log)
            pump.start()
            with observer.stage("wait", timeout_s=spec.timeout_seconds) as info:
                exited = self._wait(container_id, started + spec.timeout_seconds)
                timed_out = not exited
                if timed_out:
                    bound.info("container_timeout", timeout_s=spec.timeout_seconds)
                    with _docker_errors("stop"):
                        # SIGTERM, then SIGKILL after the grace period, done by the engine.
                        self.api.stop(container_id,
                                      timeout=math.ceil(self.config.stop_grace_seconds))
                    self._wait(container_id,
                               time.monotonic() + self.config.stop_grace_seconds + 30)
                info["timed_out"] = timed_out
            duration = time.monotonic() - started
            with observer.stage("collect") as info:
                pump.join(timeout=10)
                with _docker_errors("inspect"):
                    state = self.api.inspect_container(container_id)["State"]
                exit_code = state.get("ExitCode")
                oom_killed = bool(state.get("OOMKilled"))
                result = CollectedResult(ResultStatus.ABSENT)
                if exit_code == 0 and not timed_out:
                    if run_dir is not None:
                        try:
                            result = self._collect_result_direct(run_dir)
                        except OSError as exc:  # the volume went away under us
                            raise SandboxError(f"collect: {exc}", stage="collect") from exc
                    else:
                        result = self._collect_result(container_id)
                if pump.error is not None:
                    bound.warning("log_capture_failed", error=str(pump.error))
                info.update(exit_code=exit_code if exit_code is not None else -1,
                            oom_killed=oom_killed, log_bytes=pump.bytes,
                            log_truncated=pump.truncated, result=result.status.value)
            finished = True
            return Outcome(
                container_id=container_id, image_id=image_id, exit_code=exit_code,
                oom_killed=oom_killed, timed_out=timed_out, duration_seconds=duration,
                log_bytes=pump.bytes, log_truncated=pump.truncated, result=result,
                log_bytes_dropped=pump.dropped,
            )
        finally:
            def remove() -> None:
                try:
                    with observer.stage("remove"):
                        self._remove(container_id)
                except SandboxError as exc:
                    bound.error("container_remove_failed", container_id=container_id,
                                error=str(exc))

            if finished and self._remover is not None:
                # Same context (trace, run_id) in the remover thread. A container that
                # exited normally is only removed later; on any error, or at shutdown,
                # it is removed now, before this call returns.
                self._remover.submit(functools.partial(contextvars.copy_context().run,
                                                       remove))
            else:
                remove()

    def drain(self, timeout: float = 30) -> bool:
        """Wait for background removals (at worker shutdown); False if some are left."""
        return self._remover.drain(timeout) if self._remover is not None else True

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
