"""What an attempt writes, and when: a short run's output and container record go with
its end (one transaction instead of three), a long run's go out while it runs, a
fenced-off end writes none of them, and the engine's log stream is read frame by
frame. SQLite and a scripted fake sandbox; no Docker."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event

from runner.control.ledger import Ledger
from runner.control.lifecycle import AttemptTail, ClaimStatus, Lifecycle
from runner.control.store import Store
from runner.domain import ErrorCode, Finish, RunStatus, utcnow
from runner.execution.executor import Executor
from runner.execution.guard import LogWriter
from runner.manifest import ManifestSource
from runner.sandbox.logpump import frames
from tests.support.fakes import FakeSandbox, Script
from tests.support.waiting import wait_until
from tests.unit.conftest import NewRunMaker, set_run
from tests.unit.test_executor import WAIT, InBackground, current, started


@pytest.fixture
def transactions(store: Store) -> Iterator[list[str]]:
    """One entry per transaction begun on the store's engine while the test runs."""
    begun: list[str] = []

    def count(_connection: Any) -> None:
        begun.append("begin")

    event.listen(store.engine, "begin", count)
    yield begun
    event.remove(store.engine, "begin", count)


def executor(ledger: Ledger, manifests: ManifestSource, sandbox: FakeSandbox,
             heartbeat_seconds: float) -> Executor:
    return Executor(ledger=ledger, manifests=manifests, sandbox=sandbox, worker_id="w",
                    lease_seconds=30.0, heartbeat_seconds=heartbeat_seconds,
                    stop_grace_seconds=1.0)


def test_a_short_attempt_is_read_claimed_and_ended_in_three_transactions(
        ledger: Ledger, manifests: ManifestSource, new_run: NewRunMaker, store: Store,
        transactions: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # No flush and no heartbeat falls due during the attempt, however slow the machine:
    # the test is about what the attempt writes, not about how fast it is.
    monkeypatch.setattr(LogWriter, "FLUSH_SECONDS", 3600.0)
    fake = FakeSandbox(Script(logs=[b"hello\n", b"world\n"], result=b'{"ok": 1}'))
    run = new_run()
    before = len(transactions)
    assert executor(ledger, manifests, fake, 20.0).execute(run.id, 1) is RunStatus.SUCCEEDED
    assert len(transactions) - before == 3  # get_run, claim, finish (with the tail)
    done = current(store, run.id)
    assert (done.status, done.log_bytes) == (RunStatus.SUCCEEDED, 12)
    assert store.read_logs(run.id) == b"hello\nworld\n"
    [attempt] = store.attempts(run.id)
    assert attempt["container_id"] == "fake-1"
    assert attempt["provenance"]["pinned"] == run.image


def test_a_long_attempt_writes_its_output_and_container_while_it_runs(
        ledger: Ledger, manifests: ManifestSource, new_run: NewRunMaker,
        store: Store) -> None:
    fake = FakeSandbox(Script(logs=[b"first line\n"], block=True))
    run = new_run()
    background = InBackground(executor(ledger, manifests, fake, 0.05), run.id, 1)
    started(fake)
    wait_until(lambda: store.read_logs(run.id) == b"first line\n", timeout=WAIT)
    wait_until(lambda: store.attempts(run.id)[0]["provenance"] is not None, timeout=WAIT)
    assert current(store, run.id).status is RunStatus.RUNNING
    fake.release()
    assert background.join() is RunStatus.SUCCEEDED
    # The end had nothing left to write: what was recorded while it ran is kept.
    [attempt] = store.attempts(run.id)
    assert attempt["container_id"] == "fake-1"
    assert attempt["provenance"]["pinned"] == run.image
    assert store.read_logs(run.id) == b"first line\n"
    assert current(store, run.id).log_bytes == len(b"first line\n")


def claimed(lifecycle: Lifecycle, new_run: NewRunMaker) -> str:
    run = new_run()
    claim = lifecycle.claim(run.id, attempt=1, worker_id="w", lease_seconds=30, known=run)
    assert claim.status is ClaimStatus.CLAIMED
    return run.id


TAIL = AttemptTail(log_offset=0, log_data=b"late output\n", container_id="c-1",
                   image_id="sha256:" + "b" * 64, provenance={"pinned": "p", "mismatches": []})


def test_a_fenced_off_end_writes_none_of_its_tail(lifecycle: Lifecycle, store: Store,
                                                 new_run: NewRunMaker) -> None:
    run_id = claimed(lifecycle, new_run)
    set_run(store, run_id, lease_expires_at=utcnow() - timedelta(seconds=60))
    assert lifecycle.take_back(run_id, 1, Finish(
        RunStatus.FAILED, error_code=ErrorCode.WORKER_LOST, error_stage="lease",
        error_message="lost"), hold_until=utcnow())
    assert not lifecycle.finish(run_id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0),
                                tail=TAIL)
    assert store.read_logs(run_id) == b""
    [attempt] = store.attempts(run_id)
    assert (attempt["container_id"], attempt["provenance"]) == (None, None)


def test_a_retry_that_loses_to_a_cancel_ends_canceled_with_its_tail(
        lifecycle: Lifecycle, store: Store, new_run: NewRunMaker) -> None:
    run_id = claimed(lifecycle, new_run)
    lifecycle.cancel(run_id, tenant=None)
    retry = Finish(RunStatus.QUEUED, exit_code=75, error_code=ErrorCode.NONZERO_EXIT,
                   error_stage="run", error_message="exit 75",
                   next_attempt_at=utcnow(), log_bytes=len(TAIL.log_data))
    assert lifecycle.finish(run_id, 1, retry, tail=TAIL)
    done = current(store, run_id)
    assert (done.status, done.error_code) == (RunStatus.CANCELED, ErrorCode.CANCELED)
    assert done.next_attempt_at is None and done.log_bytes == len(TAIL.log_data)
    assert store.read_logs(run_id) == TAIL.log_data
    [attempt] = store.attempts(run_id)
    assert (attempt["status"], attempt["container_id"]) == ("canceled", "c-1")
    assert attempt["provenance"] == TAIL.provenance


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def test_log_frames_come_in_order_and_a_cut_frame_ends_the_stream() -> None:
    body = frame(1, b"out\n") + frame(2, b"") + frame(2, b"err\n") + frame(1, b"cut sho")
    assert list(frames(io.BytesIO(body[:-2]))) == [b"out\n", b"err\n", b"cut s"]
    assert list(frames(io.BytesIO(body + b"\x01\x00"))) == [b"out\n", b"err\n", b"cut sho"]
