"""The webhook outbox and its sender, on a real migrated database (SQLite in RAM) and an
httpx MockTransport: the one row every final status writes in its own transaction (and
a fenced-off end, a retry or a run without a webhook does not), exclusive claims, and
what the sender POSTs and records for each kind of answer."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

import runner.control.lifecycle as lifecycle_module
from runner.control.delivery import USER_AGENT, WebhookSender
from runner.control.lifecycle import Lifecycle
from runner.control.models import WebhookDeliveryRow
from runner.control.outbox import (
    Delivery,
    DeliveryState,
    claim_next,
    record_attempt,
    webhook_status,
)
from runner.control.store import Store
from runner.control.webhooks import signature_valid
from runner.domain import ErrorCode, Finish, NewRun, RunStatus, utcnow
from tests.support.waiting import wait_until
from tests.unit.conftest import IMAGE, NewRunMaker, set_run
from tests.unit.test_webhooks import (
    HOOK,
    PUBLIC,
    RULES,
    SECRET,
    deliveries,
    ended_hook,
    hooked,
    resolving,
    running,
)

# The outbox: one row per final status, in the status change's transaction ------------

def test_a_finish_writes_one_delivery_and_a_late_finish_none(
        store: Store, lifecycle: Lifecycle, new_run: NewRunMaker) -> None:
    run = running(lifecycle, hooked(store, new_run))
    assert deliveries(store) == []  # the run has not ended: nothing to send yet
    assert lifecycle.finish(run.id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0))
    assert not lifecycle.finish(run.id, 1, Finish(RunStatus.FAILED, exit_code=1))
    assert not lifecycle.finish(run.id, 2, Finish(RunStatus.FAILED, exit_code=1))
    [row] = deliveries(store)
    assert (row.run_id, row.url, row.event, row.state, row.attempts) == (
        run.id, HOOK, "run.finished", "pending", 0)
    assert row.lease_until is None and row.next_attempt_at is not None


def test_a_retry_writes_no_delivery_and_a_run_without_webhook_never_does(
        store: Store, lifecycle: Lifecycle, new_run: NewRunMaker) -> None:
    run = running(lifecycle, hooked(store, new_run))
    assert lifecycle.finish(run.id, 1, Finish(RunStatus.QUEUED, exit_code=75,
                                              error_code=ErrorCode.NONZERO_EXIT))
    assert deliveries(store) == []
    plain = running(lifecycle, new_run())
    assert lifecycle.finish(plain.id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0))
    assert deliveries(store) == []


def test_the_delivery_is_written_in_the_transaction_of_the_status_change(
        store: Store, lifecycle: Lifecycle, new_run: NewRunMaker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = running(lifecycle, hooked(store, new_run))

    def broken(*_args: Any) -> None:
        raise RuntimeError("the outbox insert failed")

    monkeypatch.setattr(lifecycle_module, "record_end", broken)
    with pytest.raises(RuntimeError):
        lifecycle.finish(run.id, 1, Finish(RunStatus.SUCCEEDED, exit_code=0))
    after = store.get_run(run.id)
    assert after is not None and after.status is RunStatus.RUNNING  # rolled back together


def test_every_door_to_a_final_status_writes_the_delivery(
        store: Store, lifecycle: Lifecycle, new_run: NewRunMaker) -> None:
    canceled = hooked(store, new_run)
    lifecycle.cancel(canceled.id, tenant=None)  # end_queued: API cancel, ops cancel-queued
    assert lifecycle.end_queued(hooked(store, new_run).id, RunStatus.DEAD_LETTER,
                                error_code=ErrorCode.INTERNAL_ERROR, message="m",
                                stage="queue")
    lost = running(lifecycle, hooked(store, new_run))  # the reconciler's take_back
    set_run(store, lost.id, lease_expires_at=utcnow() - timedelta(seconds=5))
    assert lifecycle.take_back(lost.id, 1, Finish(RunStatus.DEAD_LETTER,
                                                  error_code=ErrorCode.WORKER_LOST),
                               hold_until=utcnow())
    assert not lifecycle.end_queued(canceled.id, RunStatus.CANCELED,
                                    error_code=ErrorCode.CANCELED, message="again",
                                    stage="queue")
    assert len(deliveries(store)) == 3
    assert len(deliveries(store, canceled.id)) == 1


def test_a_reuse_hit_is_created_ended_with_its_delivery(store: Store) -> None:
    run, created = store.create_run(NewRun(
        tenant="t", processor="echo", version="1.0.0", image=IMAGE, queue="q",
        input={}, timeout_seconds=30, max_attempts=1, manifest_revision="rev",
        reused_from="0" * 36, result={"ok": True}), webhook_url=HOOK)
    assert created and run.status is RunStatus.SUCCEEDED
    [row] = deliveries(store, run.id)
    assert row.state == "pending" and row.url == HOOK


def test_retention_deletes_a_runs_deliveries(store: Store, lifecycle: Lifecycle,
                                              new_run: NewRunMaker) -> None:
    run = hooked(store, new_run)
    lifecycle.cancel(run.id, tenant=None)
    assert store.prune_runs_ended_before(cutoff=utcnow() + timedelta(seconds=1)) == 1
    assert deliveries(store) == []


# Claims --------------------------------------------------------------------------------

def test_a_delivery_is_claimed_by_one_sender_at_a_time(
        store: Store, new_run: NewRunMaker) -> None:
    ended_hook(store, new_run)
    now = utcnow() + timedelta(seconds=1)
    won: list[Delivery | None] = []
    start = threading.Barrier(6)

    def race() -> None:
        start.wait()
        won.append(claim_next(store, now=now, lease_seconds=30))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claims = [c for c in won if c is not None]
    assert len(claims) == 1
    first = claims[0]
    assert claim_next(store, now=now + timedelta(seconds=29), lease_seconds=30) is None
    # The claim lapses (its sender died): another sender takes it over...
    second = claim_next(store, now=now + timedelta(seconds=31), lease_seconds=30)
    assert second is not None and second.id == first.id
    # ...and of the two, only the first outcome recorded counts.
    assert record_attempt(store, second, state=DeliveryState.DELIVERED, now=utcnow(),
                          status_code=204)
    assert not record_attempt(store, first, state=DeliveryState.PENDING, now=utcnow(),
                              status_code=500, next_attempt_at=utcnow())
    [row] = deliveries(store)
    assert (row.state, row.attempts, row.last_status_code) == ("delivered", 1, 204)
    assert claim_next(store, now=now + timedelta(hours=1), lease_seconds=30) is None


# The sender ----------------------------------------------------------------------------

class Receiver:
    """An httpx MockTransport that answers with `codes` in turn (then the last again)
    and keeps what it was sent; an exception in `codes` is raised instead."""

    def __init__(self, *codes: int | Exception) -> None:
        self.codes = list(codes)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        if isinstance(code, Exception):
            raise code
        return httpx.Response(code, headers={"Location": "http://127.0.0.1:1/"})


def sender(store: Store, receiver: Receiver, **options: Any) -> WebhookSender:
    """A sender posting to `receiver`; a failed attempt waits a minute (so one pass
    makes one attempt)."""
    options.setdefault("resolve", resolving("127.0.0.1"))
    return WebhookSender(store, prefixes=list(RULES.prefixes), secret=SECRET,
                         backoff_base=60.0, backoff_cap=60.0,
                         transport=httpx.MockTransport(receiver), **options)


def test_a_delivery_is_posted_signed_to_the_checked_address(
        store: Store, new_run: NewRunMaker) -> None:
    run = ended_hook(store, new_run, "http://127.0.0.1:9000/hooks?x=1")
    receiver = Receiver(204)
    outcomes: list[str] = []
    hooks = sender(store, receiver)
    hooks.observe = outcomes.append
    assert hooks.run_once() == 1 and outcomes == ["delivered"]
    [request] = receiver.requests
    [row] = deliveries(store)
    assert str(request.url) == "http://127.0.0.1:9000/hooks?x=1"
    assert request.headers["Host"] == "127.0.0.1:9000"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith("container-runner/")
    assert request.headers["Runner-Delivery"] == row.id
    assert signature_valid(request.headers["Runner-Signature"], request.content, SECRET)
    body = json.loads(request.content)
    assert body["event"] == "run.finished" and body["run"]["id"] == run.id
    assert body["run"]["status"] == "canceled"
    status = webhook_status(store, run.id)
    assert status is not None and status.state == "delivered" and status.attempts == 1
    assert status.last_status_code == 204 and status.delivered_at is not None
    assert status.next_attempt_at is None
    assert hooks.run_once() == 0  # delivered: never sent again


def test_https_connects_to_the_resolved_address_and_checks_the_hosts_name(
        store: Store, new_run: NewRunMaker) -> None:
    ended_hook(store, new_run, "https://hooks.example.com/in")
    receiver = Receiver(200)
    assert sender(store, receiver, resolve=resolving(PUBLIC)).run_once() == 1
    [request] = receiver.requests
    assert request.url.host == PUBLIC and request.url.scheme == "https"
    assert request.headers["Host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"


@pytest.mark.parametrize(("answer", "code", "error"), [
    (500, 500, "answered 500"),
    (302, 302, "answered 302"),  # redirects are never followed
    (httpx.ConnectError("connection refused"), None, "ConnectError: connection refused"),
    (httpx.ReadTimeout("timed out"), None, "ReadTimeout"),
])
def test_a_failed_attempt_is_retried_later_until_its_window_closes(
        store: Store, new_run: NewRunMaker,
        answer: int | Exception, code: int | None, error: str) -> None:
    run = ended_hook(store, new_run)
    receiver = Receiver(answer)
    hooks = sender(store, receiver, retry_seconds=3600)
    outcomes: list[str] = []
    hooks.observe = outcomes.append
    assert hooks.run_once() == 1
    status = webhook_status(store, run.id)
    assert status is not None and status.state == "pending"
    assert status.last_status_code == code and error in (status.last_error or "")
    assert status.next_attempt_at is not None and outcomes[0] == "retry"
    assert len(receiver.requests) == 1
    with store.session() as session:  # the window closes: the next failure is final
        session.execute(update(WebhookDeliveryRow).values(
            created_at=utcnow() - timedelta(seconds=3601), next_attempt_at=utcnow()))
    assert hooks.run_once() == 1
    assert {r.headers["Runner-Delivery"] for r in receiver.requests} == {
        deliveries(store)[0].id}
    final = webhook_status(store, run.id)
    assert final is not None and final.state == "failed" and outcomes[-1] == "failed"
    assert final.next_attempt_at is None
    assert hooks.run_once() == 0


def test_a_refused_address_is_a_failed_attempt_that_sends_nothing(
        store: Store, new_run: NewRunMaker) -> None:
    run = ended_hook(store, new_run, "https://hooks.example.com/in")
    receiver = Receiver(200)
    hooks = sender(store, receiver, resolve=resolving("10.1.2.3"), retry_seconds=3600)
    assert hooks.run_once() == 1
    assert receiver.requests == []
    status = webhook_status(store, run.id)
    assert status is not None and status.state == "pending" and status.attempts == 1
    assert "10.1.2.3, a private address; refused" in (status.last_error or "")


def test_a_url_no_longer_allowlisted_here_is_not_sent(
        store: Store, new_run: NewRunMaker) -> None:
    run = ended_hook(store, new_run, "http://127.0.0.1:9000/x")
    receiver = Receiver(200)
    hooks = WebhookSender(store, prefixes=["https://other.example/"], secret=SECRET,
                          backoff_base=60, transport=httpx.MockTransport(receiver))
    assert hooks.run_once() == 1 and receiver.requests == []
    status = webhook_status(store, run.id)
    assert status is not None and "RUNNER_WEBHOOK_ALLOWED_URLS" in (status.last_error or "")


def test_the_sender_thread_sends_as_soon_as_a_run_end_wakes_it(
        store: Store, lifecycle: Lifecycle, new_run: NewRunMaker) -> None:
    receiver = Receiver(200)
    hooks = sender(store, receiver, poll_seconds=60)
    lifecycle.listeners.append(hooks.wake)
    hooks.start()
    try:
        run = hooked(store, new_run)
        lifecycle.cancel(run.id, tenant=None)  # its run-end listener wakes the sender
        wait_until(lambda: receiver.requests, timeout=10,
                   message="the woken sender sent nothing")
    finally:
        hooks.stop()
    with store.session() as session:
        count = session.scalar(select(func.count()).select_from(WebhookDeliveryRow))
    assert count == 1 and json.loads(receiver.requests[0].content)["run"]["id"] == run.id


