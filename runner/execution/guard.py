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

import structlog

from runner.domain import Run
from runner.errors import SandboxError, ServiceUnavailableError
from runner.execution.ports import RunLedger, SandboxPort

log = structlog.get_logger(__name__)


class LogWriter:
    """Batches captured output into the store: bounded memory, live enough to follow.

    A database hiccup keeps the batch (bounded by the log cap) for the next flush.
    """

    FLUSH_BYTES = 64 * 1024
    FLUSH_SECONDS = 0.25

    def __init__(self, ledger: RunLedger, run_id: str, attempt: int, offset: int) -> None:
        self.ledger, self.run_id, self.attempt, self.offset = ledger, run_id, attempt, offset
        self._buffer = bytearray()
        self._last = 0.0
        self._lock = threading.Lock()

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
            due = bool(self._buffer) and time.monotonic() - self._last >= self.FLUSH_SECONDS
        if due:
            with contextlib.suppress(ServiceUnavailableError):
                self.flush()

    def flush(self) -> None:
        with self._lock:
            self._last = time.monotonic()
            if not self._buffer:
                return
            data = bytes(self._buffer)
            self.ledger.append_log(self.run_id, self.attempt, offset=self.offset, data=data)
            self._buffer = bytearray()
            self.offset += len(data)


@dataclass
class AttemptGuard:
    """A thread that renews the attempt's lease and stops its container on a cancel
    or when the lease turns out lost (the reconciler gave the run to someone else)."""

    ledger: RunLedger
    sandbox: SandboxPort
    run: Run
    lease_seconds: float
    interval: float
    canceled: bool = False
    lost: bool = False
    container_id: str | None = None
    writer: LogWriter | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        threading.Thread(target=self._loop, name=f"guard-{self.run.id[:8]}",
                         daemon=True).start()

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
