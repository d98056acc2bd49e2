"""fillup: writes under /run/out (or /tmp) by one pattern until a write fails.

Prints one line `FILLED {json}` (the pattern, the errno that stopped it, the bytes and
files it got written, what statvfs says) once the write failed, so a test can measure
the host side while everything is still there. With input.result it then removes what
it wrote and stores the same report as its result.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

from runner_processor import read_input, write_result

OUT = "/run/out"
CHUNK = 1024 * 1024
LIMIT = 200_000  # files, links or directories: far past any bound the tests set
# Bytes after which a pattern stops by itself (errno null): without a bound on /run/out
# the test fails instead of filling the host's disk.
GIVE_UP_BYTES = 256 * 1024 * 1024


def failed(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))


def write_all(fd, data):
    view = memoryview(data)
    written = 0
    while view:
        n = os.write(fd, view)
        written += n
        view = view[n:]
    return written


def big(root):
    """One file, in 1 MiB writes, then in 4 KiB ones once a big write no longer fits (a
    write is refused whole when its page-cache folio cannot be reserved)."""
    report = {"bytes": 0, "files": 1}
    fd = os.open(os.path.join(root, "big"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"x" * CHUNK, b"y" * 4096):
            try:
                while report["bytes"] < GIVE_UP_BYTES:
                    report["bytes"] += write_all(fd, chunk)
                report["errno"] = None
                break
            except OSError as exc:
                report["errno"] = failed(exc)
                report["bytes"] = os.fstat(fd).st_size
    finally:
        os.close(fd)
    report["bytes"] = os.stat(os.path.join(root, "big")).st_size
    return report


def small(root):
    report = {"bytes": 0, "files": 0}
    os.mkdir(os.path.join(root, "small"))
    try:
        for index in range(LIMIT):
            fd = os.open(os.path.join(root, "small", str(index)), os.O_WRONLY | os.O_CREAT,
                         0o600)
            report["files"] += 1
            try:
                report["bytes"] += write_all(fd, b"s")
            finally:
                os.close(fd)
        report["errno"] = None
    except OSError as exc:
        report["errno"] = failed(exc)
    return report


def sparse(root):
    """Files of a huge apparent size with a block written every 64 KiB: every write
    allocates a block of its own, and the extent tree grows with them."""
    report = {"bytes": 0, "files": 0, "apparent": 0}
    try:
        for index in range(LIMIT):
            path = os.path.join(root, f"sparse{index}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            report["files"] += 1
            try:
                os.ftruncate(fd, 1 << 40)  # 1 TiB apparent, no block
                for offset in range(0, 1 << 30, 64 * 1024):
                    os.pwrite(fd, b"p", offset)
                    report["bytes"] += 1
            finally:
                report["apparent"] += os.fstat(fd).st_size
                os.close(fd)
            if report["files"] * (1 << 30) // (64 * 1024) * 4096 >= GIVE_UP_BYTES:
                report["errno"] = None
                break
    except OSError as exc:
        report["errno"] = failed(exc)
    return report


def deep(root):
    """Nested directories, each opened by descriptor (no path-length limit)."""
    report = {"bytes": 0, "files": 0}
    parent = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(LIMIT):
            os.mkdir("d", 0o700, dir_fd=parent)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent)
            os.close(parent)
            parent = child
            report["files"] += 1
        report["errno"] = None
    except OSError as exc:
        report["errno"] = failed(exc)
    finally:
        os.close(parent)
    return report


def links(root):
    """Hard links with long names: no data, no inodes, only directory blocks."""
    report = {"bytes": 0, "files": 0}
    os.mkdir(os.path.join(root, "links"))
    source = None
    try:
        for index in range(LIMIT):
            if source is None or index % 60000 == 0:  # under ext4's 65000 links a file
                source = os.path.join(root, f"source{index}")
                with open(source, "wb") as handle:
                    handle.write(b"l")
            os.link(source, os.path.join(root, "links", f"{index:08d}" + "L" * 200))
            report["files"] += 1
        report["errno"] = None
    except OSError as exc:
        report["errno"] = failed(exc)
    return report


def try_exec(directory):
    """Copy an executable into `directory` and run it: the errno that stops it."""
    target = os.path.join(directory, "true-copy")
    shutil.copy("/bin/true", target)
    os.chmod(target, 0o755)
    try:
        subprocess.run([target], check=True)
    except OSError as exc:
        return failed(exc)
    finally:
        os.unlink(target)
    return None


def tmp(_root):
    info = os.stat("/tmp")
    report = {"tmp_uid": info.st_uid, "tmp_mode": oct(info.st_mode & 0o7777)}
    with open("/tmp/hello", "w") as handle:
        handle.write("hello")
    with open("/tmp/hello") as handle:
        report["tmp_read"] = handle.read()
    os.unlink("/tmp/hello")
    report["exec_tmp"] = try_exec("/tmp")
    report["exec_out"] = try_exec(OUT)
    for path in ("/app/x", "/x"):
        try:
            open(path, "w").close()
            report[f"write {path}"] = None
        except OSError as exc:
            report[f"write {path}"] = failed(exc)
    flood = big("/tmp")
    os.unlink("/tmp/big")
    report.update(flood)
    return report


MODES = {"big": big, "small": small, "sparse": sparse, "deep": deep, "links": links,
         "tmp": tmp}

given = read_input()
mode = given["mode"]
report = {"mode": mode, **MODES[mode](OUT)}
vfs = os.statvfs(OUT)
report["statvfs_avail"] = vfs.f_bavail * vfs.f_frsize
report["statvfs_files_free"] = vfs.f_favail
print("FILLED " + json.dumps(report), flush=True)
if given.get("result"):
    for entry in os.listdir(OUT):
        path = os.path.join(OUT, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    write_result(report)
sys.exit(0)
