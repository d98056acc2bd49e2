"""Artifacts: the files a processor leaves under /run/out, checked, then streamed to the
caller's `ArtifactSink`.

One set of rules (`Tally`) judges each entry from what is known before a byte of it is
read: its path, its type, its link count and its apparent size. Both transfer paths
feed it the same facts, so they give the same verdicts:

- `from_directory` walks the /run filesystem on the host (never following a link,
  never opening a FIFO to wait on it), judges the whole tree first and only then
  streams the files, in name order: a refused tree puts nothing.
- `from_archive` reads the engine's tar of /run/out as a stream; it judges each
  member's header before reading its data and puts as it goes, so a refusal found
  later discards what was put. No member whose header already breaks a bound is read.

The top-level result.json is the run's result (`transfer`), not an artifact. A sparse
file is judged by its apparent size: a 1 TiB hole is refused, never read.
"""

from __future__ import annotations

import functools
import io
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from runner.errors import SandboxError
from runner.sandbox.spec import ArtifactSink, ArtifactStatus, CollectedArtifacts, StoredArtifact

CHUNK_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_NAME_CHARS = 1024
MAX_COMPONENT_BYTES = 255
SHOWN_CHARS = 160  # a problem line names the entry, shortened past this
RESULT_NAME = b"result.json"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Kind = Literal["directory", "regular", "symlink", "hard link", "FIFO", "socket", "device",
               "special file"]
Parts = tuple[bytes, ...]


def shown(parts: Parts) -> str:
    """An entry's name for a problem line: out/..., printable, one line, not too long."""
    text = "/".join(part.decode("utf-8", "backslashreplace") for part in parts)
    text = _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", "out/" + text)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def name_problem(parts: Parts) -> str | None:
    """Why a path under out/ cannot name an artifact (None when it can): each part
    valid UTF-8 without control characters and at most 255 bytes, at most 32 deep,
    at most 1024 characters in all."""
    if len(parts) > MAX_DEPTH:
        return f"is more than {MAX_DEPTH} directories deep"
    chars = len(parts) - 1
    for part in parts:
        if len(part) > MAX_COMPONENT_BYTES:
            return f"has a name part longer than {MAX_COMPONENT_BYTES} bytes"
        try:
            text = part.decode("utf-8")
        except UnicodeDecodeError:
            return "has a name that is not valid UTF-8"
        if _CONTROL.search(text):
            return "has a control character in its name"
        chars += len(text)
    if chars > MAX_NAME_CHARS:
        return f"has a name longer than {MAX_NAME_CHARS} characters"
    return None


def artifact_name(parts: Parts) -> str:
    """The artifact's name: its path under /run/out, "/"-separated (checked UTF-8)."""
    return "/".join(part.decode("utf-8") for part in parts)


def kind_of(mode: int) -> Kind:
    """An entry's kind from its (l)stat mode."""
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "regular"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


class Tally:
    """The running verdict on one tree, entry by entry, before any data is read."""

    def __init__(self, *, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.files = 0
        self.bytes = 0

    def judge(self, parts: Parts, kind: Kind, size: int, links: int = 1
              ) -> CollectedArtifacts | bool:
        """A refusal of the whole tree, or whether this entry's bytes become an
        artifact (False: a directory, or the top-level result.json)."""
        if (problem := name_problem(parts)) is not None:
            return _refused(ArtifactStatus.INVALID, f"{shown(parts)} {problem}")
        if parts == (RESULT_NAME,) and kind != "directory":
            # The result (judged by `transfer`); but no file larger than the whole bound
            # is read through, not even to skip it.
            if kind == "regular" and size > self.max_bytes:
                return _refused(ArtifactStatus.TOO_LARGE,
                                f"{shown(parts)} is {size} bytes, more than the output "
                                f"bound of {self.max_bytes}")
            return False
        if kind == "directory":
            return False
        if kind == "regular" and links > 1:
            kind = "hard link"
        if kind != "regular":
            return _refused(ArtifactStatus.INVALID, f"{shown(parts)} is a {kind}")
        self.files += 1
        self.bytes += size
        if self.files > self.max_files:
            return _refused(ArtifactStatus.TOO_LARGE,
                            f"more than {self.max_files} files under out/ (at {shown(parts)})")
        if self.bytes > self.max_bytes:
            return _refused(ArtifactStatus.TOO_LARGE,
                            f"{shown(parts)} takes the artifacts to {self.bytes} bytes, more "
                            f"than the output bound of {self.max_bytes}")
        return True


def _refused(status: ArtifactStatus, problem: str) -> CollectedArtifacts:
    return CollectedArtifacts(status=status, problem=problem)


def _accepted(items: list[StoredArtifact]) -> CollectedArtifacts:
    return CollectedArtifacts(status=ArtifactStatus.OK,
                              items=tuple(sorted(items, key=lambda item: item.name)))


class _ChangedError(Exception):
    """A file changed between its check and its read (nothing writes there any more)."""


# Through the host's directory ---------------------------------------------------------

def from_directory(out: int, sink: ArtifactSink, *, max_bytes: int, max_files: int
                   ) -> CollectedArtifacts:
    """Judge the tree under the directory `out` (an fd), then put each of its files.

    Raises:
        OSError: the filesystem failed (the caller names the stage).
        RunnerError: the sink failed; what it was given is discarded first.
    """
    tally = Tally(max_bytes=max_bytes, max_files=max_files)
    planned: list[tuple[Parts, int]] = []
    if (refused := _scan(out, (), tally, planned)) is not None:
        return refused
    planned.sort(key=lambda entry: artifact_name(entry[0]))
    items: list[StoredArtifact] = []
    try:
        for parts, size in planned:
            items.append(_put_file(out, parts, size, sink))
    except _ChangedError as exc:
        sink.discard()
        return _refused(ArtifactStatus.INVALID, f"{exc.args[0]} changed while collected")
    except BaseException:
        sink.discard()
        raise
    return _accepted(items)


def _scan(directory: int, prefix: Parts, tally: Tally, planned: list[tuple[Parts, int]]
          ) -> CollectedArtifacts | None:
    """lstat every entry below `directory` (sorted), depth first; the first refusal."""
    with os.scandir(directory) as entries:
        names = sorted(os.fsencode(entry.name) for entry in entries)
    for name in names:
        parts = (*prefix, name)
        info = os.stat(name, dir_fd=directory, follow_symlinks=False)
        kind = kind_of(info.st_mode)
        verdict = tally.judge(parts, kind, info.st_size, info.st_nlink)
        if isinstance(verdict, CollectedArtifacts):
            return verdict
        if verdict:
            planned.append((parts, info.st_size))
        elif kind == "directory":
            below = os.open(name, _OPEN_DIR, dir_fd=directory)
            try:
                if (refused := _scan(below, parts, tally, planned)) is not None:
                    return refused
            finally:
                os.close(below)
    return None


def _put_file(out: int, parts: Parts, size: int, sink: ArtifactSink) -> StoredArtifact:
    opened: list[int] = []
    try:
        directory = out
        for part in parts[:-1]:
            directory = os.open(part, _OPEN_DIR, dir_fd=directory)
            opened.append(directory)
        fd = os.open(parts[-1], _OPEN_FILE, dir_fd=directory)
        opened.append(fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size != size:
            raise _ChangedError(shown(parts))
        reader = _FileChunks(fd, size)
        stored = sink.put(artifact_name(parts), size, reader)
        if reader.short or (reader.left == 0 and os.read(fd, 1)):  # shrank or grew
            raise _ChangedError(shown(parts))
        return stored
    finally:
        for fd in reversed(opened):
            os.close(fd)


class _FileChunks:
    """A file's first `size` bytes in chunks of at most 1 MiB."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.left = fd, size
        self.short = False

    def __iter__(self) -> Iterator[bytes]:
        while self.left > 0:
            chunk = os.read(self.fd, min(CHUNK_BYTES, self.left))
            if not chunk:
                self.short = True
                return
            self.left -= len(chunk)
            yield chunk


# Through the engine's archive -----------------------------------------------------------

class ChunkReader(io.RawIOBase):
    """A readable file over an iterable of byte chunks (an HTTP body, a generator)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill `buffer` as far as the chunks go (a short count only at their end: a
        reader such as tarfile's copy takes a short read for the end of the data)."""
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target):
            if not self._buffer:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._buffer = memoryview(chunk)
                continue
            count = min(len(target) - filled, len(self._buffer))
            target[filled:filled + count] = self._buffer[:count]
            self._buffer = self._buffer[count:]
            filled += count
        return filled

    def drain(self) -> None:
        """Run the source to its end (a source may check something there)."""
        for _ in self._chunks:
            pass


def _member_kind(member: tarfile.TarInfo) -> Kind:
    if member.isdir():
        return "directory"
    if member.islnk():
        return "hard link"
    if member.issym():
        return "symlink"
    if member.isreg():
        return "regular"
    if member.isfifo():
        return "FIFO"
    if member.ischr() or member.isblk():
        return "device"
    return "special file"


def from_archive(stream: io.RawIOBase | io.BufferedIOBase, sink: ArtifactSink, *,
                 max_bytes: int, max_files: int) -> CollectedArtifacts:
    """Judge and put the members of a tar of out/ (the engine's archive of /run/out),
    read as a stream: header first, data only for a member that passes.

    Raises:
        SandboxError: the stream is not a readable tar (stage "collect").
        RunnerError: the sink failed; what it was given is discarded first.
    """
    tally = Tally(max_bytes=max_bytes, max_files=max_files)
    items: list[StoredArtifact] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8",
                          errors="surrogateescape", bufsize=CHUNK_BYTES) as tar:
            for member in tar:
                raw = member.name.encode("utf-8", "surrogateescape")
                if raw == b"out" and member.isdir():
                    continue
                if not raw.startswith(b"out/"):
                    refused = _refused(ArtifactStatus.INVALID, f"unexpected archive entry "
                                       f"{shown((raw,))[4:]}")
                    return _discarded(sink, items, refused)
                parts = tuple(raw[len(b"out/"):].split(b"/"))
                verdict = tally.judge(parts, _member_kind(member), member.size)
                if isinstance(verdict, CollectedArtifacts):
                    return _discarded(sink, items, verdict)
                if verdict:
                    items.append(_put_member(tar, member, parts, sink))
    except tarfile.TarError as exc:
        sink.discard()
        raise SandboxError(f"collect: the archive of /run/out is unreadable: {exc}",
                           stage="collect") from exc
    except BaseException:
        sink.discard()
        raise
    return _accepted(items)


def _put_member(tar: tarfile.TarFile, member: tarfile.TarInfo, parts: Parts,
                sink: ArtifactSink) -> StoredArtifact:
    data = tar.extractfile(member)
    if data is None:  # pragma: no cover - a regular member always has a reader
        raise SandboxError(f"collect: {shown(parts)} has no data", stage="collect")
    return sink.put(artifact_name(parts), member.size,
                    iter(functools.partial(data.read, CHUNK_BYTES), b""))


def _discarded(sink: ArtifactSink, items: list[StoredArtifact],
               verdict: CollectedArtifacts) -> CollectedArtifacts:
    """A refusal found after some files were put: nothing of the collection is kept."""
    if items:
        sink.discard()
    return verdict
