"""A cancel always wins over a retry: runs that exit 75 again and again with a tiny
backoff are canceled at random moments from many threads while real workers retry
them. Every one must end `canceled`; none may stay queued with its cancel pending
(claim and the requeue pass both skip such a run, so it would sit there for ever,
counted against its tenant's cap)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

from runner.control.lifecycle import Lifecycle
from runner.control.store import Store
from runner.domain import Run, RunStatus
from runner.errors import ConflictError
from runner.settings import Settings
from tests.integration.reliability import submit_rel, wait_terminal
from tests.support.processes import WorkerProcess
from tests.support.waiting import wait_until

StartWorker = Callable[..., WorkerProcess]
RUNS = 12


def test_parallel_cancels_of_retrying_runs_all_end_canceled(
        start_worker: StartWorker, store: Store, rel_settings: Settings) -> None:
    start_worker("storm-1")
    start_worker("storm-2")
    lifecycle = Lifecycle(store)
    runs = [submit_rel(store, rel_settings, "retry-storm", {"code": 75}) for _ in range(RUNS)]
    refused: list[str] = []
    rng = random.Random(7)

    def cancel_mid_storm(run: Run, attempts: int) -> None:
        # Each run is canceled once it has been retried a few times: from then on its
        # state flips between running and queued every few hundred milliseconds.
        wait_until(lambda: (r := store.get_run(run.id)) is not None and (
            r.attempt >= attempts or r.status.terminal), timeout=180, interval=0.01)
        try:
            lifecycle.cancel(run.id, tenant="rel")
        except ConflictError:
            refused.append(run.id)  # it had already ended (retries exhausted)

    threads = [threading.Thread(target=cancel_mid_storm, args=(run, rng.randint(2, 5)))
               for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(200)
    finals = [wait_terminal(store, run.id, timeout=120) for run in runs]
    stranded = [r.id for r in finals if r.status is RunStatus.QUEUED]
    assert stranded == []
    summary = {r.id: (r.status.value, r.attempt, r.error_code) for r in finals}
    assert refused == [], summary
    assert all(r.status is RunStatus.CANCELED for r in finals), summary
    assert all(r.attempt >= 2 for r in finals), summary
