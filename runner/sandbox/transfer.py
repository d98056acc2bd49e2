"""How the input (input.json, the input files) gets into a container's /run volume, and
result.json and the artifacts out of it.

Two implementations of one small interface, chosen once per container:

- `VolumeTransfer` writes and reads the attempt's /run filesystem directly, where this
  worker mounted it on the host (runner/sandbox/runfs.py). Only for a local engine
  without user-namespace remapping, and only as root, who can give out/ to the
  processor's uid.
- `ArchiveTransfer` uses the engine's put/get archive API on the same /run volume
  (`RUNNER_DIRECT_VOLUME_IO=false`, or when the direct path is undecided).

Both reach the same bounded filesystem: the /run volume is a `local` volume bound to
it, so neither can put the input or read the result anywhere else.

Both deliver in/ as root's, read-only, each file streamed and exactly its announced
size. Both refuse a result that is a link, a FIFO or another non-regular file, or that
is larger than the cap, with the same verdicts (`_verdict`, `_accepted`), judge the
artifacts by the same rules (`artifacts.Tally`), and neither follows a link nor blocks
on a FIFO the processor left.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Generator, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import docker
import docker.errors
import requests.exceptions
import structlog

from runner.errors import SandboxError
from runner.sandbox import artifacts
from runner.sandbox.artifacts import CHUNK_BYTES, ChunkReader
from runner.sandbox.spec import (
    OUTPUT_DIR,
    RESULT_PATH,
    RUN_DIR,
    ArtifactSink,
    ArtifactStatus,
    CollectedArtifacts,
    CollectedResult,
    InputFile,
    ResultStatus,
    SandboxConfig,
)
from runner.sandbox.translate import docker_errors

log = structlog.get_logger(__name__)

# Go os.FileMode type bits, as the engine reports them in archive stat headers.
_MODE_DIR = 1 << 31
_MODE_SYMLINK = 1 << 27
_MODE_TYPE = _MODE_DIR | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19)
_TAR_SLACK = 64 * 1024  # tar headers and padding around the file
# The caller validates names; checked again here, as the one thing that keeps a file
# inside in/.
_INPUT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\Z")

Kind = Literal["symlink", "other", "regular"]


class Transfer(Protocol):
    """Input in before the start; result and artifacts out after the exit."""

    name: str

    def deliver(self, input_json: bytes, files: Sequence[InputFile] = ()) -> None:
        """Write input.json and in/ with `files` (root's, read-only) and out/ (the
        processor's).

        Raises:
            SandboxError: the files could not be written, or a file's reader gave
                more or fewer bytes than its size (stage "deliver input").
        """

    def collect(self) -> CollectedResult:
        """Read out/result.json, or say why it is not usable.

        Raises:
            SandboxError: the volume or the engine failed (stage "collect").
        """

    def collect_artifacts(self, sink: ArtifactSink, *, max_bytes: int) -> CollectedArtifacts:
        """Judge everything under out/ but result.json and put its files into `sink`
        (nothing of a refused or failed collection is kept there).

        Raises:
            SandboxError: the volume or the engine failed (stage "collect").
            RunnerError: the sink failed (after it was told to discard).
        """


def _verdict(kind: Kind, size: int, cap: int) -> CollectedResult | None:
    """The verdict on a result file from what is known before reading it; None when
    its bytes are to be read."""
    if kind == "symlink":
        return CollectedResult(ResultStatus.SYMLINK, size=size)
    if kind == "other":
        return CollectedResult(ResultStatus.NOT_REGULAR, size=size)
    if size > cap:
        return CollectedResult(ResultStatus.TOO_LARGE, size=size)
    return None


def _accepted(data: bytes, cap: int) -> CollectedResult:
    """The verdict on the bytes read (a file may grow between its stat and its read)."""
    if len(data) > cap:
        return CollectedResult(ResultStatus.TOO_LARGE, size=len(data))
    return CollectedResult(ResultStatus.OK, data=data, size=len(data))


def checked_files(files: Sequence[InputFile]) -> Sequence[InputFile]:
    """The files, once each name is known to stay inside in/ and to be unique.

    Raises:
        SandboxError: a name that is not a plain file name, or one given twice.
    """
    seen: set[str] = set()
    for file in files:
        if not _INPUT_NAME.match(file.name) or file.name in seen:
            raise SandboxError(f"deliver input: in/{file.name!r} is not a valid, unique "
                               f"file name", stage="deliver input")
        seen.add(file.name)
    return files


def input_chunks(file: InputFile) -> Generator[bytes, None, None]:
    """The file's bytes from its reader, in chunks of at most 1 MiB, exactly its size.

    Raises:
        SandboxError: the reader gave fewer or more bytes (stage "deliver input").
    """
    with file.open() as reader:
        left = file.size
        while left > 0:
            chunk = reader.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise SandboxError(f"deliver input: in/{file.name} ended after "
                                   f"{file.size - left} of its {file.size} bytes",
                                   stage="deliver input")
            left -= len(chunk)
            yield chunk
        if left < 0 or reader.read(1):
            raise SandboxError(f"deliver input: in/{file.name} has more than its "
                               f"{file.size} bytes", stage="deliver input")


def write_input_archive(target: BinaryIO, input_json: bytes, uid: int, gid: int,
                        files: Sequence[InputFile] = ()) -> None:
    """Write a tar holding `input.json` and `in/` with `files` (read-only, root's) and
    `out/` (the processor's) to `target`, each file streamed from its reader."""
    now = time.time()
    with tarfile.TarFile(fileobj=target, mode="w", copybufsize=CHUNK_BYTES) as tar:
        info = tarfile.TarInfo("input.json")
        info.size, info.mode, info.mtime = len(input_json), 0o444, now
        tar.addfile(info, io.BytesIO(input_json))
        inputs = tarfile.TarInfo("in")
        inputs.type, inputs.mode, inputs.mtime = tarfile.DIRTYPE, 0o555, now
        tar.addfile(inputs)
        for file in checked_files(files):
            info = tarfile.TarInfo(f"in/{file.name}")
            info.size, info.mode, info.mtime = file.size, 0o444, now
            with contextlib.closing(input_chunks(file)) as chunks:
                reader = ChunkReader(chunks)
                tar.addfile(info, reader)
                reader.drain()  # the reader's end: more bytes than announced is refused
        out = tarfile.TarInfo("out")
        out.type, out.mode, out.mtime, out.uid, out.gid = tarfile.DIRTYPE, 0o700, now, uid, gid
        tar.addfile(out)


def input_archive(input_json: bytes, uid: int, gid: int) -> bytes:
    """The input tar of a run without files, in memory (`write_input_archive`)."""
    buffer = io.BytesIO()
    write_input_archive(buffer, input_json, uid, gid)
    return buffer.getvalue()


class ArchiveTransfer:
    """Through the engine's archive API (works wherever the Docker socket does)."""

    name = "archive"

    def __init__(self, api: docker.APIClient, container_id: str, config: SandboxConfig) -> None:
        self.api, self.container_id = api, container_id
        self.uid, self.gid = config.uid_gid
        self.cap = config.result_max_bytes
        self.max_files = config.artifact_max_files

    def deliver(self, input_json: bytes, files: Sequence[InputFile] = ()) -> None:
        if not files:
            with docker_errors("deliver input"):
                self.api.put_archive(self.container_id, RUN_DIR,
                                     input_archive(input_json, self.uid, self.gid))
            return
        # Spooled to a temporary file, never whole in memory; the engine reads it as a
        # stream of known length.
        with tempfile.TemporaryFile() as spool:
            try:
                write_input_archive(spool, input_json, self.uid, self.gid, files)
                spool.seek(0)
            except OSError as exc:
                raise SandboxError(f"deliver input: {exc}", stage="deliver input") from exc
            with docker_errors("deliver input"):
                self.api.put_archive(self.container_id, RUN_DIR, spool)

    def collect_artifacts(self, sink: ArtifactSink, *, max_bytes: int) -> CollectedArtifacts:
        with docker_errors("collect"):
            try:
                stream, _ = self.api.get_archive(self.container_id, OUTPUT_DIR,
                                                 chunk_size=CHUNK_BYTES)
            except docker.errors.NotFound:
                return CollectedArtifacts(ArtifactStatus.OK)
        try:
            with docker_errors("collect"):
                return artifacts.from_archive(ChunkReader(stream), sink, max_bytes=max_bytes,
                                              max_files=self.max_files)
        except requests.exceptions.RequestException as exc:  # a body cut short
            raise SandboxError(f"collect: {exc}", stage="collect") from exc
        finally:
            # Closed unread past a refused member: its data is never streamed.
            getattr(stream, "close", lambda: None)()

    def collect(self) -> CollectedResult:
        with docker_errors("collect"):
            try:
                stream, info = self.api.get_archive(self.container_id, RESULT_PATH,
                                                    chunk_size=64 * 1024)
            except docker.errors.NotFound:
                return CollectedResult(ResultStatus.ABSENT)
        try:
            mode, size = int(info.get("mode", 0)), int(info.get("size", 0))
            kind: Kind = ("symlink" if info.get("linkTarget") or mode & _MODE_SYMLINK
                          else "other" if mode & _MODE_TYPE else "regular")
            if (early := _verdict(kind, size, self.cap)) is not None:
                return early
            buffer = bytearray()
            with docker_errors("collect"):
                for chunk in stream:
                    buffer += chunk
                    if len(buffer) > self.cap + _TAR_SLACK:
                        return CollectedResult(ResultStatus.TOO_LARGE, size=len(buffer))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        with tarfile.open(fileobj=io.BytesIO(bytes(buffer)), mode="r") as tar:
            member = tar.next()
            if member is None:
                return CollectedResult(ResultStatus.ABSENT)
            kind = ("symlink" if member.issym() or member.islnk()
                    else "regular" if member.isreg() else "other")
            if (late := _verdict(kind, member.size, self.cap)) is not None:
                return late
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted is not None else b""
        return _accepted(data, self.cap)


class VolumeTransfer:
    """Through the /run volume's directory on the host: no archive round trips."""

    name = "volume"

    def __init__(self, run_dir: Path, config: SandboxConfig) -> None:
        self.run_dir = run_dir
        self.uid, self.gid = config.uid_gid
        self.cap = config.result_max_bytes
        self.max_files = config.artifact_max_files

    def deliver(self, input_json: bytes, files: Sequence[InputFile] = ()) -> None:
        try:
            self._deliver(input_json, checked_files(files))
        except OSError as exc:
            raise SandboxError(f"deliver input: {exc}", stage="deliver input") from exc

    def _deliver(self, input_json: bytes, files: Sequence[InputFile]) -> None:
        directory = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _write_new(directory, "input.json", [input_json])
            os.mkdir("in", 0o555, dir_fd=directory)
            inputs = os.open("in", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=directory)
            try:
                os.fchmod(inputs, 0o555)  # whatever the umask: listable, not writable
                for file in files:
                    with contextlib.closing(input_chunks(file)) as chunks:
                        _write_new(inputs, file.name, chunks)
            finally:
                os.close(inputs)
            os.mkdir("out", 0o700, dir_fd=directory)
            os.chown("out", self.uid, self.gid, dir_fd=directory, follow_symlinks=False)
            os.chmod("out", 0o700, dir_fd=directory)
        finally:
            os.close(directory)

    def collect(self) -> CollectedResult:
        try:
            return self._collect()
        except OSError as exc:  # the volume went away under us
            raise SandboxError(f"collect: {exc}", stage="collect") from exc

    def collect_artifacts(self, sink: ArtifactSink, *, max_bytes: int) -> CollectedArtifacts:
        try:
            directory = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                out = os.open("out", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=directory)
            finally:
                os.close(directory)
            try:
                return artifacts.from_directory(out, sink, max_bytes=max_bytes,
                                                max_files=self.max_files)
            finally:
                os.close(out)
        except OSError as exc:
            raise SandboxError(f"collect: {exc}", stage="collect") from exc

    def _collect(self) -> CollectedResult:
        directory = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                out = os.open("out", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                              dir_fd=directory)
            except OSError:
                return CollectedResult(ResultStatus.ABSENT)
            try:
                return self._read_result(out)
            finally:
                os.close(out)
        finally:
            os.close(directory)

    def _read_result(self, out: int) -> CollectedResult:
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
            kind: Kind = "regular" if stat.S_ISREG(info.st_mode) else "other"
            if (early := _verdict(kind, info.st_size, self.cap)) is not None:
                return early
            chunks, total = [], 0
            while total <= self.cap and (chunk := os.read(fd, self.cap + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
            return _accepted(b"".join(chunks), self.cap)
        finally:
            os.close(fd)


def _write_new(directory: int, name: str, chunks: Iterable[bytes]) -> None:
    """Create `name` in `directory` (never through a link, never over a file) as
    root's, read-only, holding `chunks`."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o444, dir_fd=directory)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fchmod(fd, 0o444)
    finally:
        os.close(fd)


class TransferChooser:
    """Decides, once per process, whether the volume path is usable at all, and then
    per container which of the two paths it takes."""

    def __init__(self, api: docker.APIClient, config: SandboxConfig) -> None:
        self.api, self.config = api, config
        self._direct: bool | None = None  # decided on first use (one `info` call)

    def for_container(self, container_id: str, run_dir: Path) -> Transfer:
        """The path for one container whose /run filesystem is mounted at `run_dir`."""
        if self.direct_io() and os.path.isdir(run_dir) and os.access(run_dir, os.W_OK):
            return VolumeTransfer(run_dir, self.config)
        return ArchiveTransfer(self.api, container_id, self.config)

    def direct_io(self) -> bool:
        """Whether this process may use the volume path at all (decided once)."""
        if self._direct is None:
            # Only root can give out/ to the processor's uid; a remote engine's paths are
            # not ours (ssh:// also looks local to docker-py, but its paths are absent).
            if not (self.config.direct_volume_io and os.geteuid() == 0
                    and self.api.base_url.startswith("http+docker:")):
                self._direct = False
                return False
            try:
                with docker_errors("info"):
                    options = " ".join(self.api.info().get("SecurityOptions") or [])
            except SandboxError as exc:
                # Undecided: this run takes the archive path, the next one asks again
                # (a pooled connection the engine dropped fails once, like this).
                log.warning("direct_volume_io_undecided", error=exc.message)
                return False
            # Remapped or rootless engines own the files under other ids than ours.
            self._direct = "userns" not in options and "rootless" not in options
        return self._direct
