"""What a processor container is: its labels, the platform's settings, one attempt's
spec (input files included), how it ended, and the artifacts it left. Plain data;
nothing here talks to Docker.

`spec_for` is the one builder of a `ContainerSpec`, used by the worker and by
`runner processor run` alike, so a local run is the production container by code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Protocol

from runner.manifest.model import Limits

MANAGED_LABEL = "io.container-runner.managed"
# Which deployment (database) made a container: a reconciler only ever touches its
# own, so two runners sharing one Docker engine cannot remove each other's.
INSTANCE_LABEL = "io.container-runner.instance"
RUN_LABEL = "io.container-runner.run-id"
ATTEMPT_LABEL = "io.container-runner.attempt"
WORKER_LABEL = "io.container-runner.worker-id"
# The worker host (RUNNER_HOST_ID) whose engine runs the container.
HOST_LABEL = "io.container-runner.host-id"

# Inside the container: a private tmpfs, not the host's /tmp.
CONTAINER_TMP = "/tmp"  # noqa: S108
RUN_DIR = "/run"
RESULT_PATH = "/run/out/result.json"
INPUT_DIR = "/run/in"
OUTPUT_DIR = "/run/out"
# Where each attempt's /run filesystem (runner/sandbox/runfs.py) is made and mounted on
# the worker's host, one directory per deployment: the engine must see this path.
RUN_FS_ROOT = Path("/var/lib/container-runner/run")
IMAGE_ID = re.compile(r"^sha256:[a-f0-9]{64}$")

LogSink = Callable[[bytes], None]


@dataclass(frozen=True)
class SandboxConfig:
    """Platform-wide container settings (from `Settings`)."""

    user: str = "65532:65532"
    tmp_size_bytes: int = 64 * 1024 * 1024
    run_fs_root: Path = RUN_FS_ROOT
    # RUNNER_RUN_OUTPUT_BOUND=off: where this process cannot make the bounded /run
    # filesystems (a worker in a container with only the Docker socket), run processors
    # on a plain volume, unbounded, instead of refusing them; logged at every start.
    # The default refuses.
    require_run_bound: bool = True
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
    # At most this many regular files under /run/out become artifacts; more is
    # `ArtifactStatus.TOO_LARGE` (the inode count bounds what can exist, this what is kept).
    artifact_max_files: int = 1000

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)

    @property
    def tmp_inodes(self) -> int:
        """The /tmp tmpfs's inode cap: one per 16 KiB of its size, at least 1024."""
        return max(1024, self.tmp_size_bytes // (16 * 1024))


@dataclass(frozen=True)
class InputFile:
    """A file delivered read-only at /run/in/<name> before the start.

    `name` is validated by the caller; `open` gives a fresh reader of exactly `size`
    bytes from the caller's storage (the sandbox closes it), so a file is streamed into
    the container and never held whole in memory.
    """

    name: str
    size: int
    open: Callable[[], BinaryIO]


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
    # Everything the processor may write under /run/out, held while it writes (ENOSPC).
    output_bytes: int = Limits.output_bytes
    environment: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    files: tuple[InputFile, ...] = ()


def container_name(run_id: str, attempt: int) -> str:
    """Deterministic, so a second create of the same attempt is a 409 we recognise."""
    return f"runner-{run_id}-{attempt}"


def spec_for(*, run_id: str, attempt: int, image: str, limits: Limits,
             timeout_seconds: float, input_json: bytes,
             labels: Mapping[str, str] | None = None,
             files: Sequence[InputFile] = ()) -> ContainerSpec:
    """The container of attempt `attempt` of `run_id` under a processor's `limits`.

    The timeout is the smaller of the run's and the processor's; the environment and
    the run and attempt labels are the same for a worker's run and a local one.
    """
    return ContainerSpec(
        name=container_name(run_id, attempt),
        image=image,
        cpus=limits.cpus,
        memory_bytes=limits.memory_bytes,
        pids_limit=limits.pids,
        timeout_seconds=min(timeout_seconds, limits.timeout_seconds),
        log_cap_bytes=limits.log_bytes,
        input_json=input_json,
        output_bytes=limits.output_bytes,
        environment={"RUNNER_RUN_ID": run_id, "RUNNER_ATTEMPT": str(attempt)},
        labels={RUN_LABEL: run_id, ATTEMPT_LABEL: str(attempt), **(labels or {})},
        files=tuple(files),
    )


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
class StoredArtifact:
    """One file the processor left under /run/out, as the sink stored it; `name` is
    its path under /run/out, "/"-separated ("report.csv", "pages/1.txt")."""

    name: str
    size: int
    sha256: str
    media_type: str


class ArtifactSink(Protocol):
    """Where a run's artifacts go (the caller's storage); the sandbox only streams."""

    def put(self, name: str, size: int, chunks: Iterable[bytes]) -> StoredArtifact:
        """Store one artifact's bytes (streamed; the sink hashes and sniffs them).

        Raises:
            RunnerError: a subclass such as StorageError; the sandbox discards the
                collection and re-raises.
        """
        ...

    def discard(self) -> None:
        """Drop everything put so far in this collection (nothing of a failed
        collection is half-kept)."""
        ...


class ArtifactStatus(StrEnum):
    NONE = "none"  # not collected: no sink, or the container did not exit by itself
    OK = "ok"
    # A symlink, FIFO, socket, device or hard link; a name that is not UTF-8 or holds a
    # control character; too long a name or too deep a tree.
    INVALID = "invalid"
    # More bytes (apparent size) than output_bytes, or more files than artifact_max_files.
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class CollectedArtifacts:
    """What became of /run/out besides result.json; `problem` is one line naming the
    entry and why ("out/link.txt is a symlink") when the status is not OK."""

    status: ArtifactStatus = ArtifactStatus.NONE
    items: tuple[StoredArtifact, ...] = ()
    problem: str | None = None


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
    artifacts: CollectedArtifacts = CollectedArtifacts()
