"""The file store: both backends (a directory, and chunk rows in a migrated SQLite)
commit whole blobs once, read exact ranges, refuse bad keys, and sweep what a crash
left; `BlobUpload` hashes, keeps the head and stops at the cap leaving nothing."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from runner.control.blobdb import DatabaseBlobStore
from runner.control.blobs import (
    CHUNK_BYTES,
    HEAD_BYTES,
    KEY,
    BlobStore,
    BlobUpload,
    DirectoryBlobStore,
    blob_key,
    open_blob_store,
    tenant_namespace,
)
from runner.control.models import BlobChunkRow, BlobRow
from runner.control.store import Store
from runner.errors import ConfigError, NotFoundError, PayloadTooLargeError, StorageError
from tests.support.memdb import MemDatabases

SMALL_CHUNK = 1000  # database chunks in these tests: ranges cross many of them
DATA = bytes(range(256)) * 20 + b"tail"  # 5124 bytes: six chunks, the last one short
# The commit's look-up of its key (SQLite quotes the column name, PostgreSQL does not).
KEY_CHECK = re.compile(r'SELECT blobs\.id\s+FROM blobs\s+WHERE blobs\."?key"? = ')
BAD_KEYS = ["../../etc/passwd", "a" * 32 + "/aa/" + "A" * 64, "a" * 32 + "/ab/" + "a" * 63,
            "a" * 32 + "/aa/" + "a" * 64 + "/..", ""]


@pytest.fixture(params=["directory", "database"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path,
          memdb: MemDatabases) -> Iterator[BlobStore]:
    if request.param == "directory":
        yield DirectoryBlobStore(tmp_path / "files")
    else:
        with memdb.fresh() as store:
            yield DatabaseBlobStore(store, chunk_bytes=SMALL_CHUNK)


def put(blobs: BlobStore, data: bytes, tenant: str = "t") -> str:
    upload = BlobUpload(blobs, cap=len(data))
    upload.write(data)
    return upload.finish(tenant).key


def temps(blobs: BlobStore) -> int:
    """Temporary blobs left in the store."""
    if isinstance(blobs, DirectoryBlobStore):
        return len(list(blobs.tmp.iterdir()))
    assert isinstance(blobs, DatabaseBlobStore)
    with blobs.store.session() as session:
        return session.scalar(select(func.count()).where(BlobRow.key.is_(None))) or 0


def read_all(blobs: BlobStore, key: str, **window: Any) -> bytes:
    return b"".join(blobs.read(key, **window))


# Keys ----------------------------------------------------------------------------

def test_a_key_is_the_tenants_namespace_then_the_hash() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    key = blob_key("acme", sha)
    assert key == f"{hashlib.sha256(b'acme').hexdigest()[:32]}/{sha[:2]}/{sha}"
    assert KEY.fullmatch(key)
    assert tenant_namespace("acme") != tenant_namespace("other")


@pytest.mark.parametrize("sha", ["A" * 64, "a" * 63, "g" * 64, "../" + "a" * 61, ""])
def test_a_key_of_anything_but_a_lowercase_hex_sha256_is_refused(sha: str) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        blob_key("t", sha)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_every_operation_refuses_a_key_of_the_wrong_shape(blobs: BlobStore, key: str) -> None:
    for operation in (blobs.read, blobs.open, blobs.size, blobs.exists, blobs.delete):
        with pytest.raises(ValueError, match="not a blob key"):
            operation(key)
    temp = blobs.begin()
    with pytest.raises(ValueError, match="not a blob key"):
        temp.commit(key)
    temp.abort()
    assert temps(blobs) == 0


# Both backends -------------------------------------------------------------------

def test_a_committed_blob_reads_back_whole(blobs: BlobStore) -> None:
    key = put(blobs, DATA)
    assert read_all(blobs, key) == DATA
    assert blobs.size(key) == len(DATA)
    assert blobs.exists(key)
    with blobs.open(key) as file:
        assert file.read(10) == DATA[:10]
        assert file.read() == DATA[10:]
    assert temps(blobs) == 0


def test_the_same_bytes_are_stored_once_and_the_second_commit_says_so(
        blobs: BlobStore) -> None:
    first, second = BlobUpload(blobs, cap=100), BlobUpload(blobs, cap=100)
    first.write(b"same bytes")
    second.write(b"same bytes")
    assert first.finish("t").created is True
    again = second.finish("t")
    assert again.created is False
    assert read_all(blobs, again.key) == b"same bytes"
    assert list(blobs.keys(older_than=time.time() + 60)) == [again.key]
    assert temps(blobs) == 0


def test_another_tenants_same_bytes_are_its_own_blob(blobs: BlobStore) -> None:
    mine, theirs = put(blobs, b"x", "me"), put(blobs, b"x", "them")
    assert mine != theirs
    blobs.delete(mine)
    assert blobs.read(theirs) and read_all(blobs, theirs) == b"x"


def test_an_aborted_blob_leaves_nothing_and_a_second_abort_is_harmless(
        blobs: BlobStore) -> None:
    temp = blobs.begin()
    temp.write(DATA)
    temp.abort()
    temp.abort()
    assert temps(blobs) == 0
    assert list(blobs.keys(older_than=time.time() + 60)) == []


def test_abort_after_commit_keeps_the_blob(blobs: BlobStore) -> None:
    temp = blobs.begin()
    temp.write(b"kept")
    key = blob_key("t", hashlib.sha256(b"kept").hexdigest())
    assert temp.commit(key) is True
    temp.abort()
    assert read_all(blobs, key) == b"kept"
    with pytest.raises(ValueError):
        temp.write(b"more")


@pytest.mark.parametrize(("start", "end"), [
    (0, None), (0, 0), (0, 1), (1, 2), (SMALL_CHUNK - 1, SMALL_CHUNK + 1),
    (SMALL_CHUNK, 2 * SMALL_CHUNK), (SMALL_CHUNK, 2 * SMALL_CHUNK + 1), (999, 4001),
    (len(DATA) - 1, None), (len(DATA) - 1, len(DATA)), (len(DATA), None),
    (len(DATA) + 10, None), (5, len(DATA) + 100), (3, 3)])
def test_a_range_reads_exactly_those_bytes(blobs: BlobStore, start: int,
                                           end: int | None) -> None:
    key = put(blobs, DATA)
    assert read_all(blobs, key, start=start, end=end) == DATA[start:end]


@pytest.mark.parametrize(("start", "end"), [(-1, None), (10, 9)])
def test_an_invalid_range_is_refused(blobs: BlobStore, start: int, end: int | None) -> None:
    key = put(blobs, DATA)
    with pytest.raises(ValueError, match="invalid byte range"):
        blobs.read(key, start=start, end=end)


def test_an_empty_blob_is_stored_and_reads_as_nothing(blobs: BlobStore) -> None:
    key = put(blobs, b"")
    assert key.endswith(hashlib.sha256(b"").hexdigest())
    assert blobs.size(key) == 0
    assert list(blobs.read(key)) == []
    assert list(blobs.read(key, start=0, end=10)) == []
    with blobs.open(key) as file:
        assert file.read() == b""


def test_a_missing_blob_is_not_found_at_the_call_and_deleting_it_is_fine(
        blobs: BlobStore) -> None:
    key = blob_key("t", "0" * 64)
    with pytest.raises(NotFoundError):
        blobs.read(key)  # not iterated: the error comes from the call itself
    with pytest.raises(NotFoundError):
        blobs.open(key)
    assert blobs.size(key) is None
    assert not blobs.exists(key)
    blobs.delete(key)


def test_a_deleted_blob_is_gone(blobs: BlobStore) -> None:
    key = put(blobs, DATA)
    blobs.delete(key)
    assert not blobs.exists(key)
    with pytest.raises(NotFoundError):
        blobs.read(key)
    if isinstance(blobs, DatabaseBlobStore):  # the chunks went with the row
        with blobs.store.session() as session:
            assert session.scalar(select(func.count()).select_from(BlobChunkRow)) == 0


def test_keys_lists_committed_blobs_written_before_the_time(blobs: BlobStore) -> None:
    key = put(blobs, DATA)
    unfinished = blobs.begin()
    unfinished.write(b"half")
    assert list(blobs.keys(older_than=time.time() + 60)) == [key]
    assert list(blobs.keys(older_than=time.time() - 60)) == []
    unfinished.abort()


def test_sweep_temp_removes_unfinished_uploads_older_than_the_time(blobs: BlobStore) -> None:
    key = put(blobs, DATA)
    unfinished = blobs.begin()
    unfinished.write(b"half")
    assert blobs.sweep_temp(older_than=time.time() - 60) == 0
    assert temps(blobs) == 1
    assert blobs.sweep_temp(older_than=time.time() + 60) == 1
    assert temps(blobs) == 0
    assert read_all(blobs, key) == DATA  # committed blobs are never swept
    with pytest.raises(StorageError):  # the crashed upload cannot come back
        unfinished.write(b"x" * SMALL_CHUNK)
        unfinished.commit(blob_key("t", "1" * 64))


# BlobUpload ----------------------------------------------------------------------

def test_an_upload_hashes_sizes_and_keeps_the_head(blobs: BlobStore) -> None:
    data = os.urandom(HEAD_BYTES + 5000)
    upload = BlobUpload(blobs, cap=len(data))
    for at in range(0, len(data), 7000):
        upload.write(data[at:at + 7000])
    done = upload.finish("t")
    assert done.sha256 == upload.sha256 == hashlib.sha256(data).hexdigest()
    assert done.size == upload.size == len(data)
    assert done.head == upload.head == data[:HEAD_BYTES]
    assert done.key == blob_key("t", done.sha256) and done.created
    assert read_all(blobs, done.key) == data


def test_an_upload_of_exactly_the_cap_is_accepted(blobs: BlobStore) -> None:
    upload = BlobUpload(blobs, cap=10)
    upload.write(b"12345")
    upload.write(b"67890")
    assert upload.finish("t").size == 10


def test_one_byte_over_the_cap_is_refused_and_leaves_no_temporary_blob(
        blobs: BlobStore) -> None:
    upload = BlobUpload(blobs, cap=10)
    upload.write(b"1234567890")
    with pytest.raises(PayloadTooLargeError, match="over the 10 byte cap") as raised:
        upload.write(b"x")
    assert raised.value.context == {"cap": 10}
    assert temps(blobs) == 0
    with pytest.raises(ValueError):
        upload.write(b"")
    assert list(blobs.keys(older_than=time.time() + 60)) == []


def test_an_upload_left_by_an_error_in_its_block_is_aborted(blobs: BlobStore) -> None:
    with pytest.raises(RuntimeError), BlobUpload(blobs, cap=100) as upload:
        upload.write(b"partial")
        raise RuntimeError("the client went away")
    assert temps(blobs) == 0


def test_two_concurrent_commits_of_one_key_leave_one_blob(blobs: BlobStore) -> None:
    """Both writers pass the "is it there?" check before either commits: the unique
    key (database) or link(2) (directory) makes exactly one of them the writer."""
    key = blob_key("t", hashlib.sha256(DATA).hexdigest())
    barrier = threading.Barrier(2, timeout=10)
    held = hold_after_key_check(blobs.store, barrier) if isinstance(
        blobs, DatabaseBlobStore) else [True, True]
    results: list[bool] = []

    def commit() -> None:
        temp = blobs.begin()
        temp.write(DATA)
        if isinstance(blobs, DirectoryBlobStore):
            barrier.wait()
        results.append(temp.commit(key))

    threads = [threading.Thread(target=commit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(held) == 2  # both did miss the other's commit
    assert sorted(results) == [False, True]
    assert list(blobs.keys(older_than=time.time() + 60)) == [key]
    assert read_all(blobs, key) == DATA
    assert temps(blobs) == 0


def hold_after_key_check(store: Store, barrier: threading.Barrier) -> list[bool]:
    """Each commit's look-up of the key waits for the other's, so both miss; a True
    per look-up held."""
    held: list[bool] = []

    @event.listens_for(store.engine, "after_cursor_execute")
    def wait(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if KEY_CHECK.match(statement):
            barrier.wait()
            held.append(True)

    return held


# The directory backend -------------------------------------------------------------

def test_a_directory_blob_is_a_private_file_at_its_key(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "files")
    key = put(blobs, DATA)
    path = tmp_path / "files" / "blobs" / key
    assert path.read_bytes() == DATA
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (tmp_path / "files", blobs.blobs, blobs.tmp, path.parent, path.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_directory_read_comes_in_pieces_of_at_most_a_chunk(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "files")
    data = os.urandom(2 * CHUNK_BYTES + 123)
    key = put(blobs, data)
    pieces = list(blobs.read(key, start=1))
    assert max(map(len, pieces)) <= CHUNK_BYTES and b"".join(pieces) == data[1:]


def test_a_symbolic_link_at_a_key_is_not_followed(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "files")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    key = blob_key("t", "2" * 64)
    path = blobs.blobs / key
    path.parent.mkdir(parents=True)
    path.symlink_to(secret)
    with pytest.raises(StorageError):
        blobs.open(key)
    with pytest.raises(StorageError):
        blobs.read(key)
    assert not blobs.exists(key)
    assert list(blobs.keys(older_than=time.time() + 60)) == []


def test_directory_ages_are_modification_times(tmp_path: Path) -> None:
    blobs = DirectoryBlobStore(tmp_path / "files")
    old, new = put(blobs, b"old"), put(blobs, b"new")
    stale, fresh = blobs.begin(), blobs.begin()
    stale.write(b"crashed")
    fresh.write(b"streaming")
    day_ago = time.time() - 86400
    os.utime(blobs.blobs / old, (day_ago, day_ago))
    os.utime(stale.path, (day_ago, day_ago))
    assert list(blobs.keys(older_than=time.time() - 3600)) == [old]
    assert blobs.sweep_temp(older_than=time.time() - 3600) == 1
    assert temps(blobs) == 1 and blobs.exists(new)


# The database backend ----------------------------------------------------------------

def test_a_database_blob_is_chunk_rows_of_the_chunk_size(store: Store) -> None:
    blobs = DatabaseBlobStore(store, chunk_bytes=SMALL_CHUNK)
    key = put(blobs, DATA)
    with store.session() as session:
        sizes = session.scalars(select(func.length(BlobChunkRow.data))
                                .order_by(BlobChunkRow.seq)).all()
    assert sizes == [SMALL_CHUNK] * 5 + [len(DATA) - 5 * SMALL_CHUNK]
    # Read by a store of another chunk size: the blob's own chunk size counts.
    assert read_all(DatabaseBlobStore(store, chunk_bytes=64), key, start=990,
                    end=3010) == DATA[990:3010]


def test_database_chunks_over_a_chunk_are_read_in_pieces_of_at_most_one(store: Store) -> None:
    blobs = DatabaseBlobStore(store, chunk_bytes=2 * CHUNK_BYTES)
    data = os.urandom(2 * CHUNK_BYTES + 10)
    key = put(blobs, data)
    pieces = list(blobs.read(key, start=5))
    assert max(map(len, pieces)) <= CHUNK_BYTES and b"".join(pieces) == data[5:]


def test_a_database_blob_deleted_while_read_is_a_storage_error(store: Store) -> None:
    blobs = DatabaseBlobStore(store, chunk_bytes=SMALL_CHUNK)
    key = put(blobs, DATA)
    pieces = blobs.read(key)
    blobs.delete(key)
    with pytest.raises(StorageError, match="lost chunks"):
        list(pieces)


# The factory ---------------------------------------------------------------------

def test_the_factory_builds_the_configured_store(tmp_path: Path, store: Store) -> None:
    assert open_blob_store("directory", directory=tmp_path, store=None).kind == "directory"
    assert open_blob_store("database", directory=tmp_path, store=store).kind == "database"
    with pytest.raises(ConfigError, match="needs the run database"):
        open_blob_store("database", directory=tmp_path, store=None)
    with pytest.raises(ConfigError, match="unknown file store 's3'"):
        open_blob_store("s3", directory=tmp_path, store=store)
