"""The database file store on a real PostgreSQL: a multi-chunk blob round-trips and its
ranges read right, racing commits of one key leave one blob, and a crashed upload is
swept. A database of its own, so the counts are this module's alone."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import delete, event, func, select

from runner.control.blobdb import DatabaseBlobStore
from runner.control.blobs import BlobUpload, blob_key
from runner.control.models import BlobChunkRow, BlobRow
from runner.control.store import Store
from runner.errors import StorageError
from tests.integration.conftest import PG_URL, SESSION
from tests.support.services import scratch_database

CHUNK = 256 * 1024
SIZE = 5 * 1024 * 1024
# The commit's look-up of its key.
KEY_CHECK = re.compile(r'SELECT blobs\.id\s+FROM blobs\s+WHERE blobs\."?key"? = ')


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    with scratch_database(PG_URL, f"runner_blobs_{SESSION}") as url:
        store = Store(url)
        yield store
        store.close()


@pytest.fixture
def blobs(store: Store) -> Iterator[DatabaseBlobStore]:
    yield DatabaseBlobStore(store, chunk_bytes=CHUNK)
    with store.session() as session:  # each test starts from an empty store
        session.execute(delete(BlobRow))  # the chunks cascade


def count(store: Store, query: Any) -> int:
    with store.session() as session:
        return session.scalar(query) or 0


def temp_rows(store: Store) -> int:
    return count(store, select(func.count()).where(BlobRow.key.is_(None)))


def test_a_five_mib_blob_round_trips_and_its_ranges_read_right(
        blobs: DatabaseBlobStore, store: Store) -> None:
    data = os.urandom(SIZE)
    upload = BlobUpload(blobs, cap=SIZE)
    for at in range(0, SIZE, 100_000):  # pieces that do not line up with the chunks
        upload.write(data[at:at + 100_000])
    done = upload.finish("tenant")
    assert done.sha256 == hashlib.sha256(data).hexdigest() and done.created
    assert count(store, select(func.count()).select_from(BlobChunkRow)) == SIZE // CHUNK
    assert count(store, select(func.max(func.length(BlobChunkRow.data)))) == CHUNK
    assert blobs.size(done.key) == SIZE
    assert hashlib.sha256(b"".join(blobs.read(done.key))).hexdigest() == done.sha256
    for start, end in [(0, 1), (CHUNK - 1, CHUNK + 1), (CHUNK, 2 * CHUNK),
                       (1024 * 1024 + 3, 3 * 1024 * 1024 - 7), (SIZE - 1, None),
                       (SIZE, None), (17, SIZE + 100)]:
        assert b"".join(blobs.read(done.key, start=start, end=end)) == data[start:end], \
            (start, end)
    with blobs.open(done.key) as file:
        assert file.read(5) == data[:5]
        assert file.read() == data[5:]
    assert temp_rows(store) == 0


def test_two_concurrent_commits_of_one_key_leave_one_blob(
        blobs: DatabaseBlobStore, store: Store) -> None:
    """Both look the key up before either commits (held at a barrier), so the unique
    key decides: one UPDATE waits for the other's commit, then fails, and drops its
    temporary blob."""
    data = os.urandom(CHUNK + 10)
    key = blob_key("tenant", hashlib.sha256(data).hexdigest())
    barrier = threading.Barrier(2, timeout=10)
    held: list[bool] = []

    def hold(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if KEY_CHECK.match(statement):
            barrier.wait()
            held.append(True)

    results: list[bool] = []

    def commit() -> None:
        temp = blobs.begin()
        temp.write(data)
        results.append(temp.commit(key))

    event.listen(store.engine, "after_cursor_execute", hold)
    try:
        threads = [threading.Thread(target=commit) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        event.remove(store.engine, "after_cursor_execute", hold)
    assert len(held) == 2
    assert sorted(results) == [False, True]
    assert count(store, select(func.count()).where(BlobRow.key == key)) == 1
    assert temp_rows(store) == 0
    assert count(store, select(func.count()).select_from(BlobChunkRow)) == 2
    assert b"".join(blobs.read(key)) == data


def test_sweep_temp_removes_an_unfinished_upload(blobs: DatabaseBlobStore,
                                                 store: Store) -> None:
    kept = BlobUpload(blobs, cap=10)
    kept.write(b"committed")
    key = kept.finish("tenant").key
    crashed = BlobUpload(blobs, cap=SIZE)
    crashed.write(os.urandom(CHUNK + 1))  # one chunk row written, the rest buffered
    assert temp_rows(store) == 1
    assert blobs.sweep_temp(older_than=time.time() - 60) == 0  # still fresh: kept
    assert blobs.sweep_temp(older_than=time.time() + 60) == 1
    assert temp_rows(store) == 0
    assert count(store, select(func.count()).select_from(BlobChunkRow)) == 1  # kept's
    assert list(blobs.keys(older_than=time.time() + 60)) == [key]
    with pytest.raises(StorageError):  # what the crashed upload had is gone for good
        crashed.write(os.urandom(CHUNK))


def test_an_unreachable_database_is_a_storage_error() -> None:
    gone = Store("postgresql://runner:runner@127.0.0.1:1/runner")
    try:
        with pytest.raises(StorageError, match="database file store"):
            DatabaseBlobStore(gone).begin()
    finally:
        gone.close()
