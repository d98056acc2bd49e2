"""Captured output in the database: appended by the worker in chunks, read by offset.

`StoreLogs` is a mixin of `Store` (it needs only `session()`), like `StoreReports`:
every log read and write goes through it, and a follower reads only the chunks past
its offset (`log_chunks_since`), never the whole log again.
"""

from __future__ import annotations

import sys
from typing import Any

from sqlalchemy import LargeBinary, Select, func, insert, literal, select
from sqlalchemy.orm import Session

from runner.control.models import LogChunkRow, RunRow
from runner.control.reports import HasSessions
from runner.domain import RunStatus


def captured_bytes(run_id: str) -> Select[Any]:
    """Bytes of output stored for a run, over every attempt (a query to run or embed)."""
    return (select(func.coalesce(func.sum(func.length(LogChunkRow.data)), 0))
            .where(LogChunkRow.run_id == run_id))


def log_chunks_since(run_id: str, offset: int) -> Select[int, bytes]:
    """The run's log chunks that end after byte `offset`, in order: what a reader that
    already has `offset` bytes still needs (a query to run or count).

    The lower bound on `offset` (the start of the chunk holding byte `offset`) lets the
    `(run_id, offset)` index skip every earlier chunk; the `offset + length` condition
    then drops a chunk that ends exactly at `offset`.
    """
    start = (select(func.coalesce(func.max(LogChunkRow.offset), 0))
             .where(LogChunkRow.run_id == run_id, LogChunkRow.offset <= offset)
             .scalar_subquery())
    return (select(LogChunkRow.offset, LogChunkRow.data)
            .where(LogChunkRow.run_id == run_id, LogChunkRow.offset >= start,
                   LogChunkRow.offset + func.length(LogChunkRow.data) > offset)
            .order_by(LogChunkRow.offset))


def _read(session: Session, run_id: str, offset: int, limit: int) -> bytes:
    """Up to `limit` bytes from byte `offset` on, from the chunks that end after it."""
    out = bytearray()
    rows = session.execute(log_chunks_since(run_id, offset).execution_options(yield_per=8))
    for start, data in rows:
        out += data[max(0, offset - start):]
        if len(out) >= limit:
            break
    rows.close()
    return bytes(out[:limit])


class StoreLogs:
    """Appending and reading a run's captured output."""

    def append_log(self: HasSessions, run_id: str, attempt: int, *, offset: int,
                   data: bytes) -> None:
        """Store one chunk of captured output, fenced by the attempt still running.

        One INSERT ... SELECT that takes no lock on the run's row, so a worker frozen
        mid-write cannot block the reconciler from taking its run back. The run's
        `log_bytes` is brought up to date when the attempt ends.
        """
        live = select(literal(run_id), literal(attempt), literal(offset),
                      literal(data, LargeBinary())).where(
            RunRow.id == run_id, RunRow.attempt == attempt,
            RunRow.status == RunStatus.RUNNING.value)
        with self.session() as session:
            session.execute(insert(LogChunkRow).from_select(
                ["run_id", "attempt", "offset", "data"], live))

    def read_logs_since(self: HasSessions, run_id: str, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes of captured output from byte `offset` on, reading only
        the chunks that end after `offset` (what a follower polls with), and of those
        only as many as `limit` needs."""
        with self.session() as session:
            return _read(session, run_id, offset, limit)

    def read_logs(self: HasSessions, run_id: str, *, offset: int = 0,
                  limit: int | None = None) -> bytes:
        """Captured output from byte `offset` on (all attempts, in order), all of it
        unless `limit` says how much."""
        with self.session() as session:
            return _read(session, run_id, offset, limit if limit is not None else sys.maxsize)

    def log_offset(self: HasSessions, run_id: str) -> int:
        """Bytes of output captured so far, over every attempt."""
        with self.session() as session:
            total = session.scalar(captured_bytes(run_id))
        return int(total or 0)
