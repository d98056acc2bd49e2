"""What runs beside a container while it runs: its lease, its cancel, its output.

`AttemptGuard` is a thread that renews the attempt's lease every heartbeat and stops
the container when a cancel arrives or the lease turns out lost; `LogWriter` batches
captured output into the database, bounded in memory and live enough to follow.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from runner.control.lifecycle import AttemptTail
from runner.domain import Run
from runner.errors import SandboxError, ServiceUnavailableError
from runner.execution.ports import RunLedger, SandboxPort

log = structlog.get_logger(__name__)


class LogWriter:
    """Batches captured output into the store: bounded memory, live enough to follow.

    The first batch goes out one flush period after the container started, with the
    attempt's container record (`started`): a run that ends sooner writes neither on
    its own, both go with its end (`take_tail`, in the end's transaction). A database
    hiccup keeps the batch (bounded by the log cap) and the record for the next flush,
    or for the end.
    """

    FLUSH_BYTES = 64 * 1024
    FLUSH_SECONDS = 0.25

    def __init__(self, ledger: RunLedger, run_id: str, attempt: int, offset: int) -> None:
        self.ledger, self.run_id, self.attempt, self.offset = ledger, run_id, attempt, offset
        self._buffer = bytearray()
        self._last = time.monotonic()
        self._record: dict[str, Any] | None = None  # the container record, until written
        self._lock = threading.Lock()

    def started(self, **found: Any) -> None:
        """The attempt's container record (container_id, image_id, provenance), kept to
        go with the next flush; the flush period counts from here."""
        with self._lock:
            self._record = {**(self._record or {}), **found}
            self._last = time.monotonic()

    def write(self, chunk: bytes) -> None:
        """Called by the log pump thread for each chunk of output."""
        with self._lock:
            self._buffer += chunk
            due = (len(self._buffer) >= self.FLUSH_BYTES
                   or time.monotonic() - self._last >= self.FLUSH_SECONDS)
        if due:
            with contextlib.suppress(ServiceUnavailableError):
                self.flush()

    def tick(self) -> None:
        """Called a few times a second, so a last line never waits for the next one."""
        with self._lock:
            due = ((bool(self._buffer) or self._record is not None)
                   and time.monotonic() - self._last >= self.FLUSH_SECONDS)
        if due:
            with contextlib.suppress(ServiceUnavailableError):
                self.flush()

    def flush(self) -> None:
        with self._lock:
            self._last = time.monotonic()
            if self._record is not None:
                self.ledger.record_container(self.run_id, self.attempt, **self._record)
                self._record = None
            if not self._buffer:
                return
            data = bytes(self._buffer)
            self.ledger.append_log(self.run_id, self.attempt, offset=self.offset, data=data)
            self._buffer = bytearray()
            self.offset += len(data)

    def take_tail(self) -> AttemptTail:
        """What is not written yet, for the attempt's end to write; after an in-flight
        flush, and nothing is left behind for a later one."""
        with self._lock:
            record, self._record = self._record or {}, None
            data, self._buffer = bytes(self._buffer), bytearray()
            tail = AttemptTail(log_offset=self.offset, log_data=data, **record)
            self.offset += len(data)
            return tail


# What self-fencing leaves between the container's SIGKILL and the lease's end: the
# engine's kill and the timer's own step (RUNNER_LEASE_SECONDS must cover
# fence_after + RUNNER_STOP_GRACE_SECONDS + this; runner/settings.py checks it).
FENCE_MARGIN_SECONDS = 2.0


def fence_after(lease_seconds: float, stop_grace_seconds: float) -> float:
    """How long an attempt may go without renewing its lease before its worker stops
    the container itself: early enough that SIGTERM, the grace period and the SIGKILL
    are all over before the lease can expire and another host may retry the run."""
    return lease_seconds - stop_grace_seconds - FENCE_MARGIN_SECONDS


@dataclass
class AttemptGuard:
    """A thread that renews the attempt's lease and stops its container on a cancel
    or when the lease turns out lost (the reconciler gave the run to someone else);
    and a second one that fences the attempt off itself when renewals stop getting
    through (a cut network, a database that does not answer): once `fence_seconds`
    pass since the last renewal, the container is stopped, so it is gone before the
    lease expires and a retry elsewhere can never overlap it. The renewals may hang
    (a connection into a cut network); the fence timer never waits on them."""

    ledger: RunLedger
    sandbox: SandboxPort
    run: Run
    lease_seconds: float
    interval: float
    fence_seconds: float | None = None
    canceled: bool = False
    lost: bool = False
    fenced: bool = False
    container_id: str | None = None
    writer: LogWriter | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _renewed_at: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self._renewed_at = time.monotonic()  # the claim set the lease just now
        threading.Thread(target=self._loop, name=f"guard-{self.run.id[:8]}",
                         daemon=True).start()
        if self.fence_seconds is not None:
            threading.Thread(target=self._fence_loop, name=f"fence-{self.run.id[:8]}",
                             daemon=True).start()

    def _fence_loop(self) -> None:
        assert self.fence_seconds is not None
        step = min(0.25, self.fence_seconds / 4)
        while not self._stop.wait(step):
            with self._lock:
                overdue = time.monotonic() - self._renewed_at
                if overdue < self.fence_seconds or self.lost:
                    continue
                self.lost = self.fenced = True
            log.warning("attempt_fenced", run_id=self.run.id, attempt=self.run.attempt,
                        seconds_without_renewal=round(overdue, 2),
                        lease_seconds=self.lease_seconds)
            self._halt()
            return

    def stop(self) -> None:
        self._stop.set()

    def on_start(self, container_id: str) -> None:
        with self._lock:
            self.container_id = container_id
            halt = self.canceled or self.lost
        if halt:
            self._halt()

    def _halt(self) -> None:
        if self.container_id is not None:
            try:
                self.sandbox.stop(self.container_id)
            except SandboxError as exc:
                log.warning("container_stop_failed", run_id=self.run.id, error=exc.message)

    def _loop(self) -> None:
        next_beat = time.monotonic() + self.interval
        while not self._stop.wait(min(LogWriter.FLUSH_SECONDS, self.interval)):
            if self.writer is not None:
                self.writer.tick()
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + self.interval
            try:
                beat = self.ledger.heartbeat(self.run.id, self.run.attempt,
                                                lease_seconds=self.lease_seconds)
            except ServiceUnavailableError as exc:
                log.warning("lease_renewal_failed", run_id=self.run.id, error=exc.message)
                continue
            with self._lock:
                if beat.owned and not self.fenced:
                    self._renewed_at = time.monotonic()
                newly_lost = not beat.owned and not self.lost
                newly_canceled = beat.cancel_requested and not self.canceled
                self.lost = self.lost or not beat.owned
                self.canceled = self.canceled or beat.cancel_requested
            if newly_lost or newly_canceled:
                log.info("attempt_lost" if newly_lost else "attempt_canceling",
                         run_id=self.run.id, attempt=self.run.attempt)
                self._halt()
            if self.lost:
                return
