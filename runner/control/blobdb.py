"""The database file store (RUNNER_FILE_STORE=database): blobs as chunk rows.

For hosts that share nothing but the run database. A blob is a `blobs` row (its key
null while it is written) and `blob_chunks` rows of `chunk_bytes` each (the last one
shorter). Every chunk is inserted in a short transaction of its own and reads fetch
a few chunks at a time, so neither a transaction nor memory ever holds a whole blob.
The commit is one conditional UPDATE: a unique key decides between racing writers.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, BinaryIO, cast

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from runner.control.blobs import CHUNK_BYTES, byte_range, check_key
from runner.control.models import BlobChunkRow, BlobRow
from runner.control.store import Store, rows_changed
from runner.domain import utcnow
from runner.errors import NotFoundError, ServiceUnavailableError, StorageError

# How many bytes of chunks one read query fetches (a few rows, never a whole blob).
READ_BATCH_BYTES = 4 * CHUNK_BYTES
# How many keys one query of `keys` lists.
KEYS_PAGE = 500


@contextmanager
def storage_errors(doing: str) -> Iterator[None]:
    """Database failures in the block as StorageError naming what was being done (the
    store's ServiceUnavailableError included, its context such as `retry_after` kept)."""
    try:
        yield
    except StorageError:
        raise
    except ServiceUnavailableError as exc:
        raise StorageError(f"database file store: could not {doing}: {exc.message}",
                           **exc.context) from exc
    except SQLAlchemyError as exc:
        raise StorageError(f"database file store: could not {doing}: {exc}") from exc


def epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class DatabaseTempBlob:
    """A `blobs` row with a null key, filled chunk by chunk."""

    def __init__(self, owner: DatabaseBlobStore) -> None:
        self._store = owner.store
        self._chunk_bytes = owner.chunk_bytes
        self._buffer = bytearray()
        self._seq = 0
        self._size = 0
        self._open = True
        row = BlobRow(key=None, size=0, created_at=utcnow())
        with storage_errors("begin a blob"), self._store.session() as session:
            session.add(row)
            session.flush()
        self.id: int = row.id

    def write(self, data: bytes) -> None:
        if not self._open:
            raise ValueError("write to a committed or aborted blob")
        view = memoryview(data)
        while view:
            room = self._chunk_bytes - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self._chunk_bytes:
                self._flush()

    def _flush(self) -> None:
        """Insert the buffer as the next chunk. The row's created_at follows the last
        write, so `sweep_temp` leaves an upload that is still streaming alone."""
        if not self._buffer:
            return
        with storage_errors(f"write chunk {self._seq} of blob {self.id}"), \
                self._store.session() as session:
            session.execute(insert(BlobChunkRow).values(
                blob_id=self.id, seq=self._seq, data=bytes(self._buffer)))
            session.execute(update(BlobRow).where(BlobRow.id == self.id)
                            .values(created_at=utcnow()))
        self._seq += 1
        self._size += len(self._buffer)
        self._buffer.clear()

    def commit(self, key: str) -> bool:
        check_key(key)
        if not self._open:
            raise ValueError("commit of a committed or aborted blob")
        self._flush()
        with storage_errors(f"commit blob {key}"):
            try:
                with self._store.session() as session:
                    taken = session.scalar(select(BlobRow.id).where(BlobRow.key == key))
                    if taken is not None:
                        self._drop(session)
                    else:
                        # created_at becomes the commit time: the orphan sweep's grace
                        # counts from when the blob could first be referred to.
                        session.execute(update(BlobRow).where(BlobRow.id == self.id).values(
                            key=key, size=self._size, created_at=utcnow()))
                created = taken is None
            except IntegrityError:  # another writer committed it between check and update
                with self._store.session() as session:
                    self._drop(session)
                created = False
        self._open = False
        return created

    def _drop(self, session: Session) -> None:
        """Delete the temporary row; its chunks cascade (PostgreSQL, and SQLite with the
        foreign_keys pragma `make_engine` turns on). A committed row is never touched."""
        session.execute(delete(BlobRow).where(BlobRow.id == self.id, BlobRow.key.is_(None)))

    def abort(self) -> None:
        if not self._open:
            return
        self._buffer.clear()
        with storage_errors(f"drop blob {self.id}"), self._store.session() as session:
            self._drop(session)
        self._open = False


class DatabaseBlobStore:
    """Blobs in the run database, `chunk_bytes` per row."""

    kind = "database"

    def __init__(self, store: Store, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
        self.store = store
        self.chunk_bytes = chunk_bytes

    def begin(self) -> DatabaseTempBlob:
        return DatabaseTempBlob(self)

    def read(self, key: str, *, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        check_key(key)
        with storage_errors(f"read blob {key}"), self.store.session() as session:
            found = session.execute(select(BlobRow.id, BlobRow.size)
                                    .where(BlobRow.key == key)).first()
            if found is None:
                raise NotFoundError(f"no blob {key}")
            blob_id, size = found
            begin, stop = byte_range(size, start, end)
            # Every chunk but the last has the size of the first; read it from the
            # blob, not from this store's setting, which may have changed since.
            chunk = 0 if begin == stop else session.scalar(
                select(func.length(BlobChunkRow.data))
                .where(BlobChunkRow.blob_id == blob_id, BlobChunkRow.seq == 0))
        if begin == stop:
            return iter(())
        if not chunk:
            raise StorageError(f"database file store: blob {key} has lost its chunks")
        return self._pieces(key, blob_id, chunk, begin, stop)

    def _pieces(self, key: str, blob_id: int, chunk: int, begin: int, stop: int
                ) -> Iterator[bytes]:
        """Bytes [begin, stop) of the blob, fetching the covering chunks a few at a time."""
        first, last = begin // chunk, (stop - 1) // chunk
        batch = max(1, READ_BATCH_BYTES // chunk)
        for low in range(first, last + 1, batch):
            high = min(low + batch, last + 1)
            with storage_errors(f"read blob {key}"), self.store.session() as session:
                rows = session.execute(
                    select(BlobChunkRow.seq, BlobChunkRow.data)
                    .where(BlobChunkRow.blob_id == blob_id, BlobChunkRow.seq >= low,
                           BlobChunkRow.seq < high)
                    .order_by(BlobChunkRow.seq)).all()
            if [row.seq for row in rows] != list(range(low, high)):
                raise StorageError(f"database file store: blob {key} lost chunks "
                                   "while it was read (deleted meanwhile?)")
            for row in rows:
                offset = row.seq * chunk
                data = memoryview(row.data)[max(begin - offset, 0):stop - offset]
                for at in range(0, len(data), CHUNK_BYTES):
                    yield bytes(data[at:at + CHUNK_BYTES])

    def open(self, key: str) -> BinaryIO:
        return cast(BinaryIO, io.BufferedReader(PiecesReader(self.read(key)),
                                                buffer_size=CHUNK_BYTES))

    def size(self, key: str) -> int | None:
        check_key(key)
        with storage_errors(f"read the size of blob {key}"), self.store.session() as session:
            size: int | None = session.scalar(select(BlobRow.size).where(BlobRow.key == key))
        return size

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete(self, key: str) -> None:
        check_key(key)
        with storage_errors(f"delete blob {key}"), self.store.session() as session:
            session.execute(delete(BlobRow).where(BlobRow.key == key))

    def keys(self, *, older_than: float) -> Iterator[str]:
        """Page by page, by id: a long sweep holds no transaction open between pages."""
        after = 0
        while True:
            with storage_errors("list blobs"), self.store.session() as session:
                page = session.execute(
                    select(BlobRow.id, BlobRow.key)
                    .where(BlobRow.key.is_not(None), BlobRow.created_at < epoch(older_than),
                           BlobRow.id > after)
                    .order_by(BlobRow.id).limit(KEYS_PAGE)).all()
            for row in page:
                if row.key is not None:
                    yield row.key
            if len(page) < KEYS_PAGE:
                return
            after = page[-1].id

    def sweep_temp(self, *, older_than: float) -> int:
        with storage_errors("sweep temporary blobs"), self.store.session() as session:
            return rows_changed(session, delete(BlobRow).where(
                BlobRow.key.is_(None), BlobRow.created_at < epoch(older_than)))


class PiecesReader(io.RawIOBase):
    """A read-only raw file over an iterator of byte pieces (`open` of a database blob)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._pending = memoryview(piece)
        target = memoryview(buffer).cast("B")
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()  # a generator part-way through: let it end now
        super().close()
