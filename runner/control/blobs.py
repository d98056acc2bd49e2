"""The file store: content-addressed blobs of uploaded files and run artifacts.

A blob is written as a temporary blob, then committed under its key
(`<tenant namespace>/<sha[:2]>/<sha>`), so a reader only ever sees whole blobs and
the same bytes of one tenant are stored once. Two backends (`open_blob_store`): a
directory on this host (here) and chunks in the run database (`blobdb`).
`BlobUpload` streams bytes in while hashing them, keeping the head for sniffing and
refusing past a cap, so no upload is ever held whole in memory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Protocol

from runner.errors import ConfigError, NotFoundError, PayloadTooLargeError, StorageError

if TYPE_CHECKING:
    from runner.control.store import Store

HEAD_BYTES = 64 * 1024  # how much of the start of a blob is kept for sniffing
CHUNK_BYTES = 1024 * 1024  # the largest piece `read` yields
# Every committed key. Backends refuse any other (ValueError), so no key can walk a path.
KEY = re.compile(r"^[0-9a-f]{32}/[0-9a-f]{2}/[0-9a-f]{64}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# A failed link(2) with one of these means the filesystem has no hard links.
NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV}


def tenant_namespace(tenant: str) -> str:
    """The tenant's folder of keys: a digest, so a tenant name never reaches a path."""
    return hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:32]


def blob_key(tenant: str, sha256_hex: str) -> str:
    """The key of a tenant's blob of this SHA-256.

    Raises:
        ValueError: `sha256_hex` is not 64 lowercase hex digits.
    """
    if not SHA256_HEX.fullmatch(sha256_hex):
        raise ValueError(f"not a lowercase hex SHA-256: {sha256_hex!r}")
    return f"{tenant_namespace(tenant)}/{sha256_hex[:2]}/{sha256_hex}"


def check_key(key: str) -> str:
    """`key`, if it has the shape of a committed key. Raises: ValueError otherwise."""
    if not KEY.fullmatch(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


def byte_range(size: int, start: int, end: int | None) -> tuple[int, int]:
    """[start, end) clamped to a blob of `size` bytes (empty when start is past it).

    Raises:
        ValueError: a negative start, or an end before the start.
    """
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end})")
    stop = size if end is None else min(end, size)
    return min(start, stop), stop


class TempBlob(Protocol):
    """A blob being written; nobody can read it until it is committed."""

    def write(self, data: bytes) -> None: ...
    # Durably become `key`: True if new, False if `key` already existed (then this
    # temporary blob is dropped).
    def commit(self, key: str) -> bool: ...
    # Drop it; safe to call twice, or after commit (then it does nothing).
    def abort(self) -> None: ...


class BlobStore(Protocol):
    """Where blobs live. Keys are `KEY`-shaped; any other is a ValueError. A missing
    blob is NotFoundError from `read` and `open`, raised at the call."""

    kind: str  # "directory" | "database"

    def begin(self) -> TempBlob: ...
    # Bytes [start, end) in pieces of at most CHUNK_BYTES, never the whole blob in memory.
    def read(self, key: str, *, start: int = 0, end: int | None = None
             ) -> Iterator[bytes]: ...
    def open(self, key: str) -> BinaryIO: ...  # a readable file of the whole blob
    def size(self, key: str) -> int | None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...  # a missing blob is fine
    # Committed keys whose blob was written before this epoch time (the orphan sweep).
    def keys(self, *, older_than: float) -> Iterator[str]: ...
    # Delete temporary blobs (crashed uploads) last written to before this epoch time;
    # how many. The last write, not the first: an upload still streaming is kept.
    def sweep_temp(self, *, older_than: float) -> int: ...


@dataclass(frozen=True)
class UploadedBlob:
    """A committed upload. `created` is False when those bytes were already stored."""

    key: str
    sha256: str
    size: int
    head: bytes
    created: bool


class BlobUpload:
    """Streams bytes into a TempBlob while computing SHA-256 and the size, keeping the
    first HEAD_BYTES for sniffing; refuses past `cap`. As a context manager, an upload
    not finished when the block ends is aborted."""

    def __init__(self, store: BlobStore, cap: int) -> None:
        self.cap = cap
        self.sha256 = ""  # hex, after finish
        self.size = 0
        self.head = b""
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._temp = store.begin()
        self._open = True

    def write(self, data: bytes) -> None:
        """Raises: PayloadTooLargeError past the cap (the temporary blob is dropped)."""
        if not self._open:
            raise ValueError("write to a finished or aborted upload")
        if self.size + len(data) > self.cap:
            self.abort()
            raise PayloadTooLargeError(f"the upload is over the {self.cap} byte cap",
                                       cap=self.cap)
        try:
            self._temp.write(data)
        except BaseException:
            self.abort()
            raise
        self._hash.update(data)
        self.size += len(data)
        if len(self._head) < HEAD_BYTES:
            self._head += data[:HEAD_BYTES - len(self._head)]

    def finish(self, tenant: str) -> UploadedBlob:
        """Commit the bytes under `blob_key(tenant, sha)`."""
        if not self._open:
            raise ValueError("finish of a finished or aborted upload")
        self.sha256 = self._hash.hexdigest()
        self.head = bytes(self._head)
        key = blob_key(tenant, self.sha256)
        try:
            created = self._temp.commit(key)
        except BaseException:
            self.abort()
            raise
        self._open = False
        return UploadedBlob(key=key, sha256=self.sha256, size=self.size, head=self.head,
                            created=created)

    def abort(self) -> None:
        self._open = False
        self._temp.abort()

    def __enter__(self) -> BlobUpload:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._open:
            self.abort()


class DirectoryTempBlob:
    """A file under root/tmp/, linked into root/blobs/ on commit."""

    def __init__(self, owner: DirectoryBlobStore) -> None:
        self._owner = owner
        self.path = owner.tmp / f"{secrets.token_hex(16)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with storage_errors("create a temporary blob"):
            self._file: BinaryIO | None = os.fdopen(os.open(self.path, flags, 0o600), "wb")

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("write to a committed or aborted blob")
        with storage_errors("write a temporary blob"):
            self._file.write(data)

    def commit(self, key: str) -> bool:
        target = self._owner.path_of(key)
        if self._file is None:
            raise ValueError("commit of a committed or aborted blob")
        file, self._file = self._file, None
        with storage_errors(f"commit blob {key}"):
            try:
                with file:
                    file.flush()
                    os.fsync(file.fileno())
                self._owner.make_dirs(target.parent)
                created = place(self.path, target)
                fsync_dir(target.parent)
            finally:
                self.path.unlink(missing_ok=True)
        return created

    def abort(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with suppress(OSError):  # a failed flush of bytes being thrown away
                file.close()
            with storage_errors("drop a temporary blob"):
                self.path.unlink(missing_ok=True)


def place(temp: Path, target: Path) -> bool:
    """Put `temp` at `target` unless something is already there; whether it was new.

    A hard link, not a rename: link(2) refuses to replace, so of two writers of the
    same key exactly one gets True (rename would silently replace). Filesystems
    without hard links get a rename after a check (the race there is harmless: the
    bytes are the same).
    """
    try:
        os.link(temp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in NO_LINKS:
            raise
    if target.exists():
        return False
    os.rename(temp, target)
    return True


def fsync_dir(path: Path) -> None:
    """Make the directory's entries durable (a new or removed name in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def storage_errors(doing: str) -> Iterator[None]:
    """An OSError in the block as StorageError naming what was being done."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"file store: could not {doing}: {exc}") from exc


class DirectoryBlobStore:
    """Blobs as files: root/blobs/<key>, temporary ones root/tmp/<random>.part.

    Writes are a temporary file, fsync, link into place, fsync of the directory: a
    crash leaves a temporary file (swept later) or a whole blob, never part of one.
    Directories are 0o700, files 0o600. Empty key directories are kept (removing
    one could race a commit into it).
    """

    kind = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        with storage_errors(f"create the file store in {root}"):
            for path in (root, self.blobs, self.tmp):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        return self.blobs / check_key(key)

    def make_dirs(self, path: Path) -> None:
        """Create `path` and missing parents below root/blobs, each made durable."""
        if path.is_dir():
            return
        self.make_dirs(path.parent)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            return
        fsync_dir(path.parent)

    def begin(self) -> DirectoryTempBlob:
        return DirectoryTempBlob(self)

    def open(self, key: str) -> BinaryIO:
        path = self.path_of(key)
        with storage_errors(f"open blob {key}"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise NotFoundError(f"no blob {key}") from exc
            return os.fdopen(fd, "rb")

    def read(self, key: str, *, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        file = self.open(key)
        try:
            with storage_errors(f"read blob {key}"):
                begin, stop = byte_range(os.fstat(file.fileno()).st_size, start, end)
                file.seek(begin)
        except BaseException:
            file.close()
            raise
        return self._pieces(file, key, stop - begin)

    @staticmethod
    def _pieces(file: BinaryIO, key: str, length: int) -> Iterator[bytes]:
        with file:
            while length > 0:
                with storage_errors(f"read blob {key}"):
                    piece = file.read(min(length, CHUNK_BYTES))
                if not piece:
                    raise StorageError(f"file store: blob {key} is shorter than it was")
                length -= len(piece)
                yield piece

    def size(self, key: str) -> int | None:
        path = self.path_of(key)
        with storage_errors(f"stat blob {key}"):
            try:
                found = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return None
        return found.st_size if stat.S_ISREG(found.st_mode) else None  # never a link

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        with storage_errors(f"delete blob {key}"):
            path.unlink(missing_ok=True)

    def keys(self, *, older_than: float) -> Iterator[str]:
        with storage_errors("list blobs"):
            for namespace in scan(self.blobs):
                for prefix in scan(namespace.path):
                    for entry in scan(prefix.path):
                        key = f"{namespace.name}/{prefix.name}/{entry.name}"
                        if KEY.fullmatch(key) and mtime(entry) < older_than:
                            yield key

    def sweep_temp(self, *, older_than: float) -> int:
        """The mtime is the last write, so an upload still streaming is never swept."""
        swept = 0
        with storage_errors("sweep temporary blobs"):
            for entry in scan(self.tmp):
                if entry.name.endswith(".part") and mtime(entry) < older_than:
                    Path(entry.path).unlink(missing_ok=True)
                    swept += 1
        return swept


def scan(path: Path | str) -> list[os.DirEntry[str]]:
    """The entries of a directory (none if it is gone), symbolic links left out."""
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if not e.is_symlink()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: neither listed nor swept


def open_blob_store(kind: str, *, directory: Path, store: Store | None) -> BlobStore:
    """The configured file store (RUNNER_FILE_STORE).

    Raises:
        ConfigError: an unknown kind, or "database" without a store.
    """
    if kind == "directory":
        return DirectoryBlobStore(directory)
    if kind == "database":
        if store is None:
            raise ConfigError("RUNNER_FILE_STORE=database needs the run database")
        from runner.control.blobdb import DatabaseBlobStore  # it imports this module

        return DatabaseBlobStore(store)
    raise ConfigError(f"RUNNER_FILE_STORE: unknown file store {kind!r} "
                      "(one of directory, database)")
