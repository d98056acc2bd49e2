"""The artifact rules on their own: names, kinds and bounds judged before a byte is read,
the same on a directory walk and on a tar stream; and the input side's exact sizes and
filesystem footprint. No Docker: a temporary directory and tars built here."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from runner.errors import SandboxError, StorageError
from runner.sandbox import ArtifactStatus, CollectedArtifacts, InputFile, StoredArtifact
from runner.sandbox.artifacts import (
    ChunkReader,
    Tally,
    from_archive,
    from_directory,
    name_problem,
    shown,
)
from runner.sandbox.runfs import BLOCK_BYTES, image_bytes, input_footprint
from runner.sandbox.transfer import input_archive, input_chunks, write_input_archive

BOUND = 64 * 1024


class Sink:
    def __init__(self, *, fail_at: int | None = None) -> None:
        self.kept: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.discards = 0
        self.fail_at = fail_at

    def put(self, name: str, size: int, chunks: Iterable[bytes]) -> StoredArtifact:
        self.puts.append(name)
        if self.fail_at is not None and len(self.puts) >= self.fail_at:
            raise StorageError("full")
        data = b"".join(chunks)
        assert len(data) == size
        self.kept[name] = data
        return StoredArtifact(name, size, hashlib.sha256(data).hexdigest(),
                              "application/octet-stream")

    def discard(self) -> None:
        self.discards += 1
        self.kept.clear()


# Names ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("parts", "problem"), [
    ((b"report.csv",), None),
    ((b"pages", b"1.txt"), None),
    (("r\u00e9sum\u00e9.txt".encode(),), None),
    ((b"bad\xffname",), "not valid UTF-8"),
    ((b"tab\tname",), "control character"),
    ((b"del\x7f",), "control character"),
    ((b"n" * 256,), "longer than 255 bytes"),
    ((b"d",) * 32, None),
    ((b"d",) * 33, "more than 32 directories deep"),
    ((b"n" * 200,) * 5, None),  # 1004 characters
    ((b"n" * 200,) * 5 + (b"x" * 20,), "longer than 1024 characters"),
])
def test_a_name_is_utf8_printable_and_bounded(parts: tuple[bytes, ...], problem: str | None
                                               ) -> None:
    found = name_problem(parts)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_problem_line_shows_any_name_printably_and_briefly() -> None:
    assert shown((b"a", b"b\tc")) == "out/a/b\\x09c"
    assert shown((b"\xff",)) == "out/\\xff"
    long = shown((b"n" * 255,) * 4)
    assert len(long) == 160 and long.endswith("…")


# The tally -----------------------------------------------------------------------------

def test_the_tally_refuses_non_regular_entries_and_counts_only_files() -> None:
    tally = Tally(max_bytes=10, max_files=2)
    assert tally.judge((b"dir",), "directory", 4096) is False
    assert tally.judge((b"result.json",), "regular", 10) is False  # the result, not counted
    assert tally.judge((b"dir", b"result.json"), "regular", 4) is True  # only the top one
    for kind in ("symlink", "FIFO", "socket", "device"):
        verdict = tally.judge((b"x",), kind, 0)
        assert isinstance(verdict, CollectedArtifacts)
        assert verdict.status is ArtifactStatus.INVALID and verdict.problem == f"out/x is a {kind}"
    linked = tally.judge((b"a",), "regular", 1, links=2)
    assert isinstance(linked, CollectedArtifacts) and linked.problem == "out/a is a hard link"


def test_the_tally_allows_exactly_the_bound_and_refuses_one_more() -> None:
    tally = Tally(max_bytes=10, max_files=5)
    assert tally.judge((b"a",), "regular", 4) is True
    assert tally.judge((b"b",), "regular", 6) is True  # 10 of 10
    over = tally.judge((b"c",), "regular", 1)
    assert isinstance(over, CollectedArtifacts) and over.status is ArtifactStatus.TOO_LARGE
    files = Tally(max_bytes=10, max_files=1)
    assert files.judge((b"a",), "regular", 0) is True
    more = files.judge((b"b",), "regular", 0)
    assert isinstance(more, CollectedArtifacts) and more.status is ArtifactStatus.TOO_LARGE
    huge_result = Tally(max_bytes=10, max_files=1).judge((b"result.json",), "regular", 11)
    assert isinstance(huge_result, CollectedArtifacts)
    assert huge_result.status is ArtifactStatus.TOO_LARGE


# The directory walk --------------------------------------------------------------------

def collect_dir(out: Path, sink: Sink, max_files: int = 10) -> CollectedArtifacts:
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return from_directory(fd, sink, max_bytes=BOUND, max_files=max_files)
    finally:
        os.close(fd)


def test_a_tree_of_files_is_put_in_name_order_without_result_or_empty_directories(
        tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "b" / "c.txt").write_bytes(b"c")
    (tmp_path / "a-z").write_bytes(b"az")
    (tmp_path / "result.json").write_bytes(b"{}")
    sink = Sink()
    collected = collect_dir(tmp_path, sink)
    assert collected.status is ArtifactStatus.OK
    assert [i.name for i in collected.items] == ["a-z", "a/b/c.txt"]
    assert sink.puts == ["a-z", "a/b/c.txt"] and sink.kept == {"a-z": b"az", "a/b/c.txt": b"c"}


@pytest.mark.parametrize("make", ["symlink", "fifo", "hardlink", "sparse", "badname"])
def test_a_bad_entry_anywhere_puts_nothing_at_all(tmp_path: Path, make: str) -> None:
    (tmp_path / "a.txt").write_bytes(b"first in name order")
    deep = tmp_path / "z" / "y"
    deep.mkdir(parents=True)
    if make == "symlink":
        (deep / "link").symlink_to("/etc/passwd")
    elif make == "fifo":
        os.mkfifo(deep / "pipe")  # never opened: the walk would block on it
    elif make == "hardlink":
        os.link(tmp_path / "a.txt", deep / "again")
    elif make == "sparse":
        with open(deep / "hole", "wb") as hole:
            hole.truncate(1 << 40)
    else:
        (deep / os.fsdecode(b"\xfe")).write_bytes(b"")
    sink = Sink()
    collected = collect_dir(tmp_path, sink)
    assert collected.status is (ArtifactStatus.TOO_LARGE if make == "sparse"
                                else ArtifactStatus.INVALID)
    assert collected.problem and collected.problem.startswith(("out/z/y/", "out/a.txt"))
    assert sink.puts == [] and sink.discards == 0


def test_a_failing_sink_is_told_to_discard_and_its_error_goes_on(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode())
    sink = Sink(fail_at=2)
    with pytest.raises(StorageError):
        collect_dir(tmp_path, sink)
    assert sink.puts == ["a", "b"] and sink.discards == 1 and sink.kept == {}


# The archive stream --------------------------------------------------------------------

def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        top = tarfile.TarInfo("out")
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return buffer


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple[
        tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    if kind == tarfile.LNKTYPE or kind == tarfile.SYMTYPE:
        info.linkname = "out/a"
    return info, None


def test_an_archive_is_put_as_it_streams_and_comes_out_sorted() -> None:
    sink = Sink()
    stream = tar_of(member("out/b", b"bb"), member("out/result.json", b"{}"),
                    member("out/a", b"a"))
    collected = from_archive(stream, sink, max_bytes=BOUND, max_files=10)
    assert collected.status is ArtifactStatus.OK
    assert [i.name for i in collected.items] == ["a", "b"]
    assert sink.puts == ["b", "a"]


@pytest.mark.parametrize(("bad", "status", "problem"), [
    (member("out/l", kind=tarfile.SYMTYPE), ArtifactStatus.INVALID, "out/l is a symlink"),
    (member("out/h", kind=tarfile.LNKTYPE), ArtifactStatus.INVALID, "out/h is a hard link"),
    (member("out/p", kind=tarfile.FIFOTYPE), ArtifactStatus.INVALID, "out/p is a FIFO"),
    (member("out/c", kind=tarfile.CHRTYPE), ArtifactStatus.INVALID, "out/c is a device"),
    (member(os.fsdecode(b"out/\xff")), ArtifactStatus.INVALID, "not valid UTF-8"),
    (member("elsewhere"), ArtifactStatus.INVALID, "unexpected archive entry"),
])
def test_a_bad_member_discards_what_was_put(bad: tuple[tarfile.TarInfo, bytes | None],
                                           status: ArtifactStatus, problem: str) -> None:
    sink = Sink()
    collected = from_archive(tar_of(member("out/a", b"a"), bad), sink, max_bytes=BOUND,
                             max_files=10)
    assert collected.status is status and collected.problem and problem in collected.problem
    assert sink.puts == ["a"] and sink.discards == 1 and sink.kept == {}


def test_a_member_over_the_bound_is_refused_from_its_header_never_read() -> None:
    header = tarfile.TarInfo("out/huge")
    header.size = 1 << 40
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("out/first"), io.BytesIO(b""))
        buffer.write(header.tobuf(tarfile.PAX_FORMAT))  # the header alone: no data follows
    buffer.seek(0)
    sink = Sink()
    collected = from_archive(buffer, sink, max_bytes=BOUND, max_files=10)
    assert collected.status is ArtifactStatus.TOO_LARGE
    assert collected.problem and collected.problem.startswith("out/huge takes the artifacts")
    assert sink.discards == 1 and sink.kept == {}


def test_a_truncated_archive_is_a_platform_failure() -> None:
    whole = tar_of(member("out/a", b"x" * 5000)).getvalue()
    sink = Sink()
    with pytest.raises(SandboxError, match="unreadable"):
        from_archive(io.BytesIO(whole[:2048]), sink, max_bytes=BOUND, max_files=10)
    assert sink.discards == 1


def test_a_chunk_reader_fills_each_read_until_the_chunks_end() -> None:
    reader = ChunkReader([b"ab", b"", b"cde", b"f"])
    assert reader.read(4) == b"abcd"
    assert reader.read(10) == b"ef"
    assert reader.read(1) == b""


# Input ---------------------------------------------------------------------------------

def given(data: bytes, size: int | None = None, name: str = "doc.bin") -> InputFile:
    return InputFile(name=name, size=len(data) if size is None else size,
                     open=lambda: io.BytesIO(data))


def test_an_input_file_is_streamed_in_chunks_of_exactly_its_size() -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    chunks = list(input_chunks(given(data)))
    assert b"".join(chunks) == data and max(len(c) for c in chunks) <= 1024 * 1024
    with pytest.raises(SandboxError, match=r"in/doc.bin ended after 5 of its 6 bytes"):
        list(input_chunks(given(b"12345", size=6)))
    with pytest.raises(SandboxError, match=r"in/doc.bin has more than its 4 bytes"):
        list(input_chunks(given(b"12345", size=4)))


def test_the_input_archive_gives_root_a_read_only_in_and_the_processor_out() -> None:
    buffer = io.BytesIO()
    write_input_archive(buffer, b"{}", 65532, 65532, [given(b"hello", name="a.txt")])
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar:
        seen = {m.name: (m.type, m.mode, m.uid, m.size) for m in tar.getmembers()}
    assert seen == {"input.json": (tarfile.REGTYPE, 0o444, 0, 2),
                    "in": (tarfile.DIRTYPE, 0o555, 0, 0),
                    "in/a.txt": (tarfile.REGTYPE, 0o444, 0, 5),
                    "out": (tarfile.DIRTYPE, 0o700, 65532, 0)}
    with tarfile.open(fileobj=io.BytesIO(input_archive(b"{}", 1, 1))) as tar:
        assert tar.getnames() == ["input.json", "in", "out"]
    for wrong in (given(b"hello", size=4), given(b"hello", size=6), given(b"x", name="../x")):
        with pytest.raises(SandboxError):
            write_input_archive(io.BytesIO(), b"{}", 1, 1, [wrong])
    with pytest.raises(SandboxError, match="unique"):
        write_input_archive(io.BytesIO(), b"{}", 1, 1, [given(b"a"), given(b"b")])


def test_the_input_footprint_is_whole_blocks_and_unchanged_without_files() -> None:
    assert input_footprint(17) == 17
    assert image_bytes(BOUND, input_footprint(17)) == image_bytes(BOUND, 17)
    one = input_footprint(17, [("a", 1)])
    assert one % BLOCK_BYTES == 0 and one >= 2 * BLOCK_BYTES  # input.json and the file
    assert input_footprint(17, [("a", 4096)]) == one  # a block is a block
    assert input_footprint(17, [("a", 4097)]) == one + BLOCK_BYTES
    # Long names take directory blocks of their own.
    short = input_footprint(0, [(f"{i}", 0) for i in range(300)])
    long = input_footprint(0, [(f"{'n' * 120}-{i}", 0) for i in range(300)])
    assert long - short >= 2 * 300 * 120 // BLOCK_BYTES * BLOCK_BYTES
