"""Submitting a batch: each item checked like a single submission, the valid ones
recorded in one transaction and queued in one Redis pipeline.

A batch is many submissions of one tenant, not one submission with many inputs:
each item is refused or accepted on its own (its error in its place), counted
against the tenant's rate limit and quota as an item, and answered in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from runner.control.batchstore import create_runs
from runner.control.queue import RunQueue
from runner.control.runs import FileRules, Prepared, Submission, needs_queueing, prepare
from runner.control.store import Store
from runner.control.webhooks import WebhookRules
from runner.domain import Run
from runner.errors import (
    InvalidRequestError,
    RateLimitedError,
    RunnerError,
    ServiceUnavailableError,
)
from runner.manifest import Manifest

log = structlog.get_logger(__name__)

# An item's answer: its run, or why it was refused.
ItemResult = Run | RunnerError


def submit_batch(items: Sequence[Submission | RunnerError], *,
                 admit: Callable[[int], int], manifest: Manifest, store: Store,
                 queue: RunQueue, default_queue: str, stop_grace_seconds: float,
                 input_max_bytes: int = 1024 * 1024, max_active: int = 0,
                 file_rules: FileRules | None = None,
                 webhook_rules: WebhookRules = WebhookRules(),
                 retry_after: int = 1) -> list[ItemResult]:
    """Check, record and queue a batch; one result per item, in order.

    `items` are one tenant's submissions, or the error that already refused an item
    (a body that is not a valid submission). `admit(n)` asks the rate limit for n
    submissions and answers how many it allows; the items past them are refused as
    rate limited (`retry_after` seconds), unless it allows none, when the whole
    batch is.

    Raises:
        RateLimitedError: the rate limit allows none of the valid items.
    """
    results: list[ItemResult | None] = [None] * len(items)
    ready: list[tuple[int, Prepared]] = []
    for index, item in enumerate(items):
        if isinstance(item, RunnerError):
            results[index] = item
            continue
        try:
            ready.append((index, prepare(item, manifest=manifest, store=store,
                                         default_queue=default_queue,
                                         input_max_bytes=input_max_bytes,
                                         file_rules=file_rules, webhook_rules=webhook_rules)))
        except InvalidRequestError as exc:
            results[index] = exc
    allowed = admit(len(ready)) if ready else 0
    if ready and allowed <= 0:
        raise RateLimitedError(f"submissions: none of this batch's {len(ready)} runs fits "
                               f"the tenant's rate limit now; retry after {retry_after}s",
                               retry_after=retry_after)
    for index, _ in ready[allowed:]:
        results[index] = RateLimitedError(
            f"over the tenant's submissions per minute; retry after {retry_after}s",
            retry_after=retry_after)
    ready = ready[:allowed]
    outcomes = create_runs(store, [(p.new, p.webhook_url) for _, p in ready],
                           max_active=max_active)
    queued: list[Run] = []
    for (index, _), outcome in zip(ready, outcomes, strict=True):
        if isinstance(outcome, RunnerError):
            results[index] = outcome
            continue
        run, created = outcome
        results[index] = run
        if needs_queueing(run, created, quiet=True):
            queued.append(run)
    try:
        queue.enqueue_many(queued, stop_grace_seconds=stop_grace_seconds)
    except ServiceUnavailableError as exc:
        # Recorded: the reconciler queues them once Redis answers (as for one run).
        log.warning("enqueue_deferred", runs=len(queued), error=exc.message)
    done = [r for r in results if r is not None]
    log.info("batch_submitted", items=len(items), queued=len(queued),
             refused=sum(isinstance(r, RunnerError) for r in done),
             run_ids=[r.id for r in queued])
    return done
