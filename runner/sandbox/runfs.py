"""The /run filesystem of one attempt: a fresh ext4 image of its own, bounded by the
manifest's `output_bytes` while the processor writes.

Each attempt gets a sparse image file of `image_bytes(output_bytes, input_bytes)`
(`input_bytes` is `input_footprint`: input.json and the input files in whole blocks)
under `SandboxConfig.run_fs_root/<instance>/<container name>/`, made with
`mkfs.ext4` and loop-mounted there (`noexec,nosuid,nodev`) by this worker. The engine
gets it as the container's `/run` volume: a `local` volume bound to that directory
(`run_volume_options`), so both transfer paths (the directory itself and the
engine's archive API) see the same files, before the start and after the exit.

After the input is delivered, `seal` sets the filesystem's reserved clusters so that
exactly `output_bytes` (in 4 KiB blocks) is left: a write past it fails inside the
container with ENOSPC, whatever the pattern (one big file, many small ones, sparse
files, deep directories, hard links: data, inodes and directory blocks all come out of
the same image). The host's disk can never hold more than the image's size for a
run; see docs/operators.md, "Output and scratch space", for the choice and its cost.

Making the filesystem needs root on the engine's host, in the engine's mount
namespace: `problem` says why a process cannot, and the sandbox refuses to run
processors without the bound (a socket-only worker cannot make one: the engine's
`tmpfs` volumes lose their files at every unmount, see the operators' guide).

Each filesystem directory holds a `lock` file, `flock`ed by the process that made it
for as long as it is in use, so a sweep (`leftovers`) never takes one a live worker
still needs; a crashed worker's lock goes with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import math
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import SandboxError

BLOCK_BYTES = 4096
INODE_BYTES = 256
# One inode per 16 KiB of the bound, within these: thousands of small files stop at
# the inode count or the bytes, whichever comes first, and the inode table (part of
# the image, written only as inodes are used) stays small.
BYTES_PER_INODE = 16 * 1024
MIN_INODES, MAX_INODES = 1024, 65536
# Superblock, group descriptors, bitmaps, the root directory: measured at most 250
# blocks (1 MiB) up to 16 GiB images with these mkfs options; one block in 2048 on top.
FIXED_OVERHEAD_BYTES = 1024 * 1024
MKFS_OPTIONS = ["-q", "-F", "-t", "ext4", "-b", str(BLOCK_BYTES), "-I", str(INODE_BYTES),
                "-m", "0", "-O", "^has_journal,^resize_inode",
                "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0"]
# noinit_itable: the kernel never zeroes unused inode tables, so they stay holes in
# the image file instead of host disk.
MOUNT_OPTIONS = "loop,noexec,nosuid,nodev,noatime,noinit_itable"
MOUNT_FLAGS = ("noexec", "nosuid", "nodev")
FS_TYPE = "ext4"
IMAGE_NAME, MOUNT_NAME, LOCK_NAME = "image", "run", "lock"
# Left in the mount point under the filesystem: an engine that sees this file at
# /run sees the bare directory, not the mounted filesystem (another mount namespace).
UNMOUNTED_MARKER = ".runner-not-mounted"
TOOL_TIMEOUT_SECONDS = 60


def _blocks(size: int) -> int:
    return max(0, math.ceil(size / BLOCK_BYTES))


def output_blocks(output_bytes: int) -> int:
    """The bound in filesystem blocks: a partial block is a whole one, and at least one."""
    return max(1, _blocks(output_bytes))


def inode_count(output_bytes: int) -> int:
    return max(MIN_INODES, min(MAX_INODES, output_bytes // BYTES_PER_INODE))


def image_bytes(output_bytes: int, input_bytes: int) -> int:
    """The image's size: the most the host's disk holds for one attempt (the file is
    sparse; only written blocks take space). `input_bytes` is `input_footprint`; the
    two blocks on top are the in/ and out/ directories."""
    blocks = output_blocks(output_bytes)
    return ((blocks + _blocks(input_bytes) + 2 + blocks // 2048) * BLOCK_BYTES
            + inode_count(output_bytes) * INODE_BYTES + FIXED_OVERHEAD_BYTES)


def _dirent_bytes(name: str) -> int:
    """An ext4 directory entry: 8 bytes of header, the name, padded to 4."""
    return 8 + (len(name.encode()) + 3) // 4 * 4


def input_footprint(input_json_bytes: int, files: Iterable[tuple[str, int]] = ()) -> int:
    """What delivering input.json and the `(name, size)` files into in/ takes of the
    filesystem, in bytes of whole blocks: each file's blocks, plus one for its extent
    tree (and one per 8 MiB on top, for a fragmented one), plus in/'s directory blocks
    at twice the entries' size (hashed directories split leaves half full). Without
    files it is input.json's size itself, so the image of a run without files is what
    it always was."""
    files = list(files)
    if not files:
        return input_json_bytes
    blocks = _blocks(input_json_bytes)
    for _, size in files:
        data = _blocks(size)
        blocks += data + 1 + data // 2048
    entries = sum(_dirent_bytes(name) for name, _ in files)
    blocks += 2 + 2 * _blocks(entries)
    return blocks * BLOCK_BYTES


def run_volume_options(path: Path) -> dict[str, str]:
    """The `local` driver options of the /run volume bound to the filesystem at `path`."""
    return {"type": "none", "o": "bind," + ",".join(MOUNT_FLAGS), "device": str(path)}


def _mounted_fs_type(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path` (in this mount namespace)."""
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as lines:
        found = None
        for line in lines:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target and " - " in line:
                found = line.split(" - ", 1)[1].split()[0]  # the last mount on top wins
        return found


def _unescape(field_text: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field_text = field_text.replace(code, char)
    return field_text


def describe(path: Path) -> dict[str, Any]:
    """What the filesystem at `path` enforces, as this host sees it (for the receipt):
    whether a filesystem is mounted there, its type, its flags and its device's size."""
    try:
        info, parent = os.stat(path), os.stat(path.parent)
        vfs = os.statvfs(path)
    except OSError:
        return {"mounted": False}
    mounted = info.st_dev != parent.st_dev
    device_bytes = None
    with contextlib.suppress(OSError, ValueError):
        sectors = Path(f"/sys/dev/block/{os.major(info.st_dev)}:{os.minor(info.st_dev)}"
                       "/size").read_text()
        device_bytes = int(sectors) * 512
    return {"mounted": mounted, "type": _mounted_fs_type(path) if mounted else None,
            "noexec": bool(vfs.f_flag & os.ST_NOEXEC),
            "nosuid": bool(vfs.f_flag & os.ST_NOSUID),
            "nodev": bool(vfs.f_flag & os.ST_NODEV), "device_bytes": device_bytes}


def expected_description(output_bytes: int, input_bytes: int) -> dict[str, Any]:
    """What `describe` reports for the filesystem `RunFilesystems.create` makes."""
    return {"mounted": True, "type": FS_TYPE, "noexec": True, "nosuid": True, "nodev": True,
            "device_bytes": image_bytes(output_bytes, input_bytes)}


@dataclass
class RunFs:
    """One attempt's mounted filesystem; `path` is the /run volume's device."""

    name: str
    directory: Path
    output_bytes: int
    input_bytes: int
    lock_fd: int | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.directory / MOUNT_NAME

    @property
    def image(self) -> Path:
        return self.directory / IMAGE_NAME


def _run(args: list[str], what: str) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False,
                              timeout=TOOL_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"run filesystem: {what}: {exc}", stage="run filesystem") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise SandboxError(f"run filesystem: {what} failed (exit {done.returncode}): "
                           f"{detail[-1] if detail else 'no output'}", stage="run filesystem")


_MNT_DETACH = 2  # umount2(2): detach now, let go once the last user is gone


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _umount(path: Path) -> None:
    """Detach the mount at `path` (lazily: a process still inside cannot block it), as
    `umount --lazy` does, by the system call itself: no tool to start for every run.
    The loop device `mount -o loop` set up clears itself once the filesystem is gone.
    """
    if _libc().umount2(os.fsencode(path), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if os.path.ismount(path):
            raise SandboxError(f"run filesystem: umount {path} failed: {os.strerror(code)}",
                               stage="run filesystem")


class RunFilesystems:
    """The per-attempt /run filesystems of one deployment on this host."""

    def __init__(self, root: Path, instance: str) -> None:
        self.root = root / instance

    def directory(self, name: str) -> Path:
        return self.root / name

    def path(self, name: str) -> Path:
        """The /run volume's device for container `name` (known before it exists)."""
        return self.directory(name) / MOUNT_NAME

    @staticmethod
    def problem() -> str | None:
        """Why this process cannot make run filesystems (None when it can)."""
        if os.geteuid() != 0:
            return ("the worker is not root: the output_bytes bound is a filesystem the "
                    "worker loop-mounts on the engine's host, which needs root")
        missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool)
                   is None]
        if missing:
            return f"missing {', '.join(missing)} (Debian packages e2fsprogs, mount)"
        if not os.path.exists("/dev/loop-control"):
            return "no /dev/loop-control: loop devices are not available"
        return None

    def create(self, name: str, *, output_bytes: int, input_bytes: int) -> RunFs:
        """Make, mount and lock a fresh filesystem for container `name` (a leftover of
        the same name, from a crashed try of this attempt, is released first).

        Raises:
            SandboxError: mkfs or mount failed (stage "run filesystem").
        """
        directory = self.directory(name)
        if directory.exists():
            self.release(name)
        fs = RunFs(name=name, directory=directory, output_bytes=output_bytes,
                   input_bytes=input_bytes)
        try:
            try:
                directory.mkdir(parents=True, mode=0o700)
            except FileNotFoundError:  # the deployment's directory went as it was made
                directory.mkdir(parents=True, mode=0o700)
            fs.lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                 0o600)
            fcntl.flock(fs.lock_fd, fcntl.LOCK_EX)
            fs.path.mkdir(mode=0o755)
            (fs.path / UNMOUNTED_MARKER).touch(mode=0o400)
            with open(fs.image, "wb") as image:
                image.truncate(image_bytes(output_bytes, input_bytes))
            _run(["mkfs.ext4", *MKFS_OPTIONS, "-N", str(inode_count(output_bytes)),
                  str(fs.image)], "mkfs.ext4")
            _run(["mount", "-t", FS_TYPE, "-o", MOUNT_OPTIONS, str(fs.image), str(fs.path)],
                 "mount")
            with contextlib.suppress(FileNotFoundError):
                (fs.path / "lost+found").rmdir()
        except BaseException:
            self.release(fs)
            raise
        return fs

    def seal(self, fs: RunFs) -> int:
        """Leave exactly the bound free (after the input is in): the rest of the image
        becomes the filesystem's reserved clusters, which no write can take. The bytes
        left to the processor.

        Raises:
            SandboxError: the filesystem is not big enough or refuses the reservation.
        """
        try:
            vfs = os.statvfs(fs.path)
            want = output_blocks(fs.output_bytes) * BLOCK_BYTES // vfs.f_frsize
            reserve = vfs.f_bfree - want
            if reserve < 0:
                raise SandboxError(f"run filesystem {fs.path} has {vfs.f_bfree} free blocks, "
                                   f"fewer than the bound's {want}", stage="run filesystem")
            device = os.stat(fs.path).st_dev
            block = Path(os.path.realpath(
                f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")).name
            Path(f"/sys/fs/ext4/{block}/reserved_clusters").write_text(str(reserve))
            left = os.statvfs(fs.path)
        except OSError as exc:
            raise SandboxError(f"run filesystem: seal {fs.path}: {exc}",
                               stage="run filesystem") from exc
        return left.f_bavail * left.f_frsize

    def release(self, fs: RunFs | str) -> None:
        """Unmount and delete a filesystem and its image; a missing one is fine."""
        name = fs if isinstance(fs, str) else fs.name
        directory = self.directory(name)
        mount = directory / MOUNT_NAME
        if os.path.ismount(mount):
            _umount(mount)
        try:
            shutil.rmtree(directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SandboxError(f"run filesystem: remove {directory}: {exc}",
                               stage="run filesystem") from exc
        finally:
            if isinstance(fs, RunFs) and fs.lock_fd is not None:
                os.close(fs.lock_fd)
                fs.lock_fd = None
        with contextlib.suppress(OSError):
            self.root.rmdir()  # the deployment's directory, once its last one is gone

    def leftovers(self) -> list[dict[str, Any]]:
        """This deployment's filesystems on this host that no process holds: each as
        {"Name", "Created" (epoch seconds)}."""
        found: list[dict[str, Any]] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and not self._held(Path(entry.path)):
                with contextlib.suppress(FileNotFoundError):
                    found.append({"Name": entry.name,
                                  "Created": entry.stat(follow_symlinks=False).st_mtime})
        return found

    def names(self) -> list[str]:
        """Every filesystem directory of this deployment on this host."""
        try:
            return sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        except FileNotFoundError:
            return []

    @staticmethod
    def _held(directory: Path) -> bool:
        try:
            fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            # Not locked yet (being made, for a moment: the sweep's grace period covers
            # that) or never finished.
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)  # closing drops the probe's lock, if it got one
        return False
